"""Gradient all-reduce overlapped with the backward pass, on real Ray actors: the same
update as the plain synchronizer bit for bit, and failures that reach the step."""

from __future__ import annotations

import time

import pytest
import torch

from flashtrain.topology import Grid

ray = pytest.importorskip("ray")

NUM_STEPS = 3
BATCH = 4
BUCKET_BYTES = 2**16  # 14 buckets of the model's 1.4 MB of gradients (ResNet-18 had 20)
COLLECTIVE_TIMEOUT_S = 60.0


def build_model(with_unused: bool = True):
    """A real torchvision ShuffleNet V2 x0.5 (0.35 M parameters in 170 tensors,
    with BatchNorm; small images keep it quick) plus, unless told otherwise, a parameter that
    never gets a gradient: its bucket is only launched after the backward."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=5)
    if with_unused:
        model.register_parameter("unused", torch.nn.Parameter(torch.ones(3)))
    return model


@ray.remote(num_cpus=0.25, concurrency_groups={"control": 1})
class Replica:
    """One grid cell that trains a model with either synchronizer."""

    def __init__(self, grid: Grid, rank: int, generation: int):
        torch.set_num_threads(1)
        from flashtrain.collective import register

        register()
        self.rank = rank
        self.comm = self._join(grid, generation)
        self.sync = None

    def _join(self, grid: Grid, generation: int):
        from flashtrain.collective import join_grid

        return join_grid(grid, self.rank, generation, timeout_s=COLLECTIVE_TIMEOUT_S,
                         rendezvous_timeout_s=120.0, prefix="overlap-")

    def train(self, overlap: bool, algorithm: str, bucket_bytes: int,
              empty_share_at: int | None = None, drain_before_sync: bool = False) -> dict:
        """``NUM_STEPS`` SGD steps on seeded data; rank 1 trains nothing at step
        ``empty_share_at`` (a tail step whose share is empty). With ``drain_before_sync``
        every parameter gets a gradient and ``sync`` is called only once the thread has
        reduced every bucket. Returns the parameters."""
        from flashtrain.collective import GradientSynchronizer, OverlappedSynchronizer

        model = build_model(with_unused=not drain_before_sync)
        params = list(model.parameters())
        kind = OverlappedSynchronizer if overlap else GradientSynchronizer
        self.sync = kind(params, self.comm, algorithm, bucket_bytes=bucket_bytes)
        optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        for step in range(NUM_STEPS):
            generator = torch.Generator().manual_seed(1000 * step + self.rank)
            images = torch.randn(BATCH, 3, 16, 16, generator=generator)
            labels = torch.randint(0, 5, (BATCH,), generator=generator)
            optimizer.zero_grad(set_to_none=False)
            self.sync.begin("sum")
            if not (step == empty_share_at and self.rank == 1):
                torch.nn.functional.cross_entropy(model(images), labels).backward()
            for param in params:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
            if overlap and drain_before_sync:
                deadline = time.monotonic() + 120
                while self.sync.in_flight:  # every bucket was made ready by a hook
                    assert time.monotonic() < deadline, "the buckets never finished"
                    time.sleep(0.001)
            self.sync.sync("sum")
            optimizer.step()
        self.sync.close()
        return {"params": [p.detach().clone() for p in params],
                "num_buckets": len(self.sync.buckets)}

    def step_then_report(self) -> dict:
        """One overlapped step whose peer never comes: what the step raised, and when."""
        from flashtrain.collective import CollectiveError, OverlappedSynchronizer, leave_grid

        model = build_model()
        self.sync = OverlappedSynchronizer(list(model.parameters()), self.comm, "torus",
                                           bucket_bytes=BUCKET_BYTES)
        began = time.monotonic()
        images = torch.randn(BATCH, 3, 16, 16)
        try:
            self.sync.begin("sum")
            torch.nn.functional.cross_entropy(model(images), torch.zeros(BATCH).long()).backward()
            self.sync.sync("sum")
            return {"raised": None}
        except CollectiveError as err:
            return {"raised": type(err).__name__, "message": str(err),
                    "elapsed": time.monotonic() - began}
        finally:
            self.sync.close()
            leave_grid(self.comm)

    def rejoin(self, grid: Grid, generation: int) -> bool:
        """Leave this member's grid (aborted or not) and join generation ``generation``."""
        from flashtrain.collective import leave_grid

        leave_grid(self.comm)
        self.comm = self._join(grid, generation)
        return True

    @ray.method(concurrency_group="control")
    def in_flight(self) -> bool:
        return self.sync is not None and self.sync.in_flight

    @ray.method(concurrency_group="control")
    def abort(self) -> int:
        from flashtrain.collective import abort_grid

        return abort_grid(self.comm, "a member died (test)")


def train_both_ways(replicas: list, algorithm: str, bucket_bytes: int,
                    empty_share_at: int | None,
                    drain_before_sync: bool = False) -> tuple[list, list]:
    runs = {}
    for overlap in (False, True):
        runs[overlap] = ray.get([r.train.remote(overlap, algorithm, bucket_bytes,
                                                empty_share_at, drain_before_sync)
                                 for r in replicas], timeout=600)
    return runs[False], runs[True]


def start_replicas(grid: Grid, generation: int) -> list:
    return [Replica.remote(grid, rank, generation) for rank in range(grid.num_workers)]


GRID = Grid(2, 2)


@pytest.fixture(scope="module")
def quartet(ray_session):
    """Four replicas joined as a 2x2 grid (both phases of the torus), for every test:
    each ``train`` call builds its own model and synchronizer over the same groups."""
    replicas = start_replicas(GRID, generation=1)
    yield replicas
    for replica in replicas:
        ray.kill(replica)


@pytest.mark.parametrize("algorithm", ["torus", "flat"])
def test_overlapped_update_is_bit_identical(quartet, algorithm):
    """Same seeds, same buckets, three steps (one with an empty share on rank 1): the
    parameters after the overlapped run equal the plain run's exactly, on every rank."""
    plain, overlapped = train_both_ways(quartet, algorithm=algorithm, bucket_bytes=BUCKET_BYTES,
                                        empty_share_at=1)
    assert overlapped[0]["num_buckets"] > 5  # several buckets, so the order matters
    for rank in range(GRID.num_workers):
        for got, want in zip(overlapped[rank]["params"], plain[rank]["params"], strict=True):
            assert torch.equal(got, want)
        for got, want in zip(overlapped[rank]["params"], overlapped[0]["params"], strict=True):
            assert torch.equal(got, want)  # the replicas agree
    initial = list(build_model().parameters())
    assert torch.equal(overlapped[0]["params"][0], initial[0].detach())  # "unused": no grad
    assert not torch.equal(overlapped[0]["params"][1], initial[1].detach())  # conv1 trained


def test_sync_after_every_bucket_is_done_reduces_nothing_twice(quartet):
    """The communication thread finished every bucket before ``sync`` was called (all
    made ready by hooks): ``sync`` must only collect them (a second round would sum the
    sums on this rank and pair the peers' next collectives with the wrong ones)."""
    plain, overlapped = train_both_ways(quartet, algorithm="torus", bucket_bytes=BUCKET_BYTES,
                                        empty_share_at=None, drain_before_sync=True)
    for rank in range(GRID.num_workers):
        for got, want in zip(overlapped[rank]["params"], plain[rank]["params"], strict=True):
            assert torch.equal(got, want)


def test_abort_reaches_the_step_while_buckets_are_in_flight(quartet):
    """The peers never train: the first bucket's all-reduce blocks on the communication
    thread; an out-of-band abort makes the step raise CollectiveAbortedError long before
    the 60 s collective timeout, and the thread lets go of the grid."""
    replica = quartet[0]
    try:
        pending = replica.step_then_report.remote()
        deadline = time.monotonic() + 300
        while not ray.get(replica.in_flight.remote(), timeout=60):
            assert time.monotonic() < deadline, "the step never started its all-reduce"
            time.sleep(0.05)
        assert ray.get(replica.abort.remote(), timeout=60) == 3  # row, column, world
        report = ray.get(pending, timeout=120)
    finally:
        # A new generation for every member, so the module's other tests find a whole grid.
        ray.get([r.rejoin.remote(GRID, 2) for r in quartet], timeout=300)
    assert report["raised"] == "CollectiveAbortedError", report
    assert "a member died (test)" in report["message"]
    assert report["elapsed"] < 50.0, report
