"""Ring primitives built from point-to-point exchanges, accumulating in fp32.

Used when values travel as 16-bit numbers: gloo's own collectives would also *add* in
16 bits, while here every hop adds the received 16-bit partial sum into an fp32
accumulator and only the value put on the wire is rounded. Each primitive costs what
its name says: a reduce-scatter sends (n-1)/n of the buffer, not n all-reduces.

``group`` is a :class:`~flashtrain.collective.gloo_backend.FlashGlooGroup` (anything with
``rank``, ``world_size``, ``exchange``, ``send_tensor`` and ``recv_tensor``).
"""

from __future__ import annotations

import torch


def padded_numel(numel: int, parts: int) -> int:
    """Smallest multiple of ``parts`` that is >= ``numel`` (equal chunks for gloo)."""
    return -(-numel // parts) * parts


def ring_reduce_scatter(group, chunks: list[torch.Tensor], wire_dtype: torch.dtype) -> None:
    """Reduce ``chunks`` (one per rank, equal sizes) so ``chunks[rank]`` holds the sum.

    At step ``s`` rank ``r`` sends its partial sum of chunk ``r-s-1`` to the right and
    adds the left neighbour's partial sum of chunk ``r-s-2``; after ``n-1`` steps chunk
    ``r`` has passed through every rank and ends at ``r``.
    """
    n, rank = group.world_size, group.rank
    if n == 1:
        return
    right, left = (rank + 1) % n, (rank - 1) % n
    inbox = torch.empty(chunks[0].numel(), dtype=wire_dtype, device=chunks[0].device)
    for step in range(n - 1):
        outgoing = chunks[(rank - step - 1) % n].to(wire_dtype).contiguous()
        group.exchange(outgoing, right, inbox, left)
        chunks[(rank - step - 2) % n].add_(inbox)


def ring_allgather(group, chunks: list[torch.Tensor]) -> None:
    """Fill every chunk given ``chunks[rank]`` (contiguous, equal sizes), in place."""
    n, rank = group.world_size, group.rank
    right, left = (rank + 1) % n, (rank - 1) % n
    for step in range(n - 1):
        group.exchange(chunks[(rank - step) % n], right, chunks[(rank - step - 1) % n], left)


def ring_allreduce(group, acc: torch.Tensor, wire_dtype: torch.dtype, scale: float = 1.0) -> None:
    """All-reduce the fp32 1-D ``acc`` in place: ring reduce-scatter, then all-gather.

    The result is ``scale * sum`` rounded once to ``wire_dtype`` (identical on every rank).
    """
    n, numel = group.world_size, acc.numel()
    chunk = padded_numel(numel, n) // n
    work = torch.zeros(n, chunk, dtype=acc.dtype, device=acc.device)
    work.view(-1)[:numel].copy_(acc)
    accs = list(work.unbind(0))
    ring_reduce_scatter(group, accs, wire_dtype)
    gathered = torch.empty(n, chunk, dtype=wire_dtype, device=acc.device)
    mine = accs[group.rank]
    gathered[group.rank].copy_(mine.mul_(scale) if scale != 1.0 else mine)
    if n > 1:
        ring_allgather(group, list(gathered.unbind(0)))
    acc.copy_(gathered.view(-1)[:numel])


def gather_reduce(group, acc: torch.Tensor, wire_dtype: torch.dtype, root: int = 0) -> None:
    """Sum every rank's fp32 ``acc`` into ``root``'s ``acc`` (others' are left as is).

    Each rank sends its whole buffer to the root, which adds in fp32: the node-leader
    reduction of the hierarchical all-reduce.
    """
    if group.world_size == 1:
        return
    if group.rank != root:
        group.send_tensor(acc.to(wire_dtype).contiguous(), root)
        return
    inbox = torch.empty(acc.numel(), dtype=wire_dtype, device=acc.device)
    for src in range(group.world_size):
        if src != root:
            group.recv_tensor(inbox, src)
            acc.add_(inbox)
