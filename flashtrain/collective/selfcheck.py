"""Every collective of a joined ``ray.util.collective`` group, run once with inputs whose
results are known in closed form, for any world size.

The GPU tier and ``make gpu-check`` run it on NCCL groups of one and of several ranks; the
integration tier runs it on flashtrain's NCCL backend over gloo, so the arguments it passes
(``allgather`` and ``reducescatter`` take one tensor per rank: ``ray.util.collective``'s
``allgather`` refuses a list whose length is not the world size) are checked on every
machine, not only where a GPU is lent.
"""

from __future__ import annotations

import torch

NUMEL = 12


def _ramp(device: torch.device, dtype: torch.dtype, scale: int) -> torch.Tensor:
    # Small integers: exact in fp16 and bf16 for the world sizes a test uses (<= 8 ranks).
    return (torch.arange(NUMEL, device=device) * scale).to(dtype)


def expected_results(world_size: int, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What :func:`run_every_op` must find on ``rank`` of ``world_size`` (on the CPU)."""
    total = world_size * (world_size + 1) // 2  # rank r contributes (r + 1) * ramp
    cpu = torch.device("cpu")
    expected = {
        "allreduce": _ramp(cpu, dtype, total),
        "broadcast": _ramp(cpu, dtype, 1),  # root 0's input
        "allgather": torch.cat([_ramp(cpu, dtype, peer + 1) for peer in range(world_size)]),
        "reducescatter": _ramp(cpu, dtype, total),
    }
    if rank == 0:  # reduce leaves the other ranks' buffers unspecified
        expected["reduce"] = _ramp(cpu, dtype, total)
    return expected


def run_every_op(group_name: str, device: torch.device, dtype: torch.dtype) -> dict:
    """Run allreduce, reduce, broadcast, allgather, reducescatter and barrier on this
    member of ``group_name``; return each result (on the CPU) keyed by op name."""
    import ray.util.collective as col

    world_size = col.get_collective_group_size(group_name)
    rank = col.get_rank(group_name)
    mine = _ramp(device, dtype, rank + 1)
    results: dict[str, torch.Tensor] = {}
    for op, root_call in (("allreduce", lambda t: col.allreduce(t, group_name=group_name)),
                          ("reduce", lambda t: col.reduce(t, 0, group_name=group_name)),
                          ("broadcast", lambda t: col.broadcast(t, 0, group_name=group_name))):
        buffer = mine.clone()
        root_call(buffer)
        results[op] = buffer
    gathered = [torch.zeros_like(mine) for _ in range(world_size)]
    col.allgather(gathered, mine.clone(), group_name=group_name)
    results["allgather"] = torch.cat(gathered)
    scattered = torch.zeros_like(mine)
    col.reducescatter(scattered, [mine.clone() for _ in range(world_size)],
                      group_name=group_name)
    results["reducescatter"] = scattered
    col.barrier(group_name=group_name)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {op: tensor.cpu() for op, tensor in results.items()}


def mismatches(results: dict, world_size: int, rank: int, dtype: torch.dtype) -> list[str]:
    """The ops whose result differs from :func:`expected_results` (empty: all correct)."""
    wrong = []
    for op, want in expected_results(world_size, rank, dtype).items():
        got = results.get(op)
        if got is None or got.dtype != want.dtype or not torch.equal(got, want):
            wrong.append(f"{op}: got {None if got is None else got.tolist()}, "
                         f"want {want.tolist()}")
    return wrong
