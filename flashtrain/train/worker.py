"""One grid cell: a model replica, its optimizer and its data shard.

The worker is a plain class (so it can be tested in one process) that the driver
wraps as a Ray actor. It never decides anything about the schedule: every step arrives
as a :class:`~flashtrain.train.clock.StepPlan` taken from the schedule actor, and the
worker trains exactly the samples the pure sharding function gives its rank.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures

import ray
import torch

from flashtrain import collective
from flashtrain.config import FlashtrainConfig
from flashtrain.task import Task, build_seeded, to_device
from flashtrain.topology import Grid
from flashtrain.train.amp import LossScaler
from flashtrain.train.clock import StepPlan, StepResult
from flashtrain.train.data import StepBatchSampler, make_val_loader, task_datasets
from flashtrain.train.decode import SkippedSample
from flashtrain.train.digest import replica_checksums
from flashtrain.train.loader import make_train_stream
from flashtrain.train.relay import RELAY_GROUP, WindowAnswer, WindowRelay
from flashtrain.train.replicas import digest_of

CONTROL_GROUP = "control"
WINDOW_GRACE_S = 10.0  # beyond the collective timeout, for a relayed window to end
_COMM_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class Worker:
    """A model replica bound to one cell of the current grid."""

    def __init__(self, config: FlashtrainConfig, task: Task):
        """``task``: what to train (:class:`flashtrain.Task`; the driver resolves a
        config's image classifier into one before it starts workers)."""
        self._config = config
        if not config.grid.use_gpu:
            torch.set_num_threads(config.grid.torch_threads)
        self.device = torch.device("cuda" if config.grid.use_gpu else "cpu")
        collective.register()
        self.task = task
        datasets = task_datasets(self.task)
        self.train_set, self.val_set = datasets.train, datasets.val
        self.num_classes = datasets.num_classes
        self.model = build_seeded(self.task, config.runtime.seed).to(self.device)
        if config.grid.use_gpu and config.model.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        opt = config.optimizer
        self.optimizer = torch.optim.SGD(
            self.task.param_groups(self.model, opt.weight_decay, opt.no_decay_bn_bias),
            lr=0.0, momentum=opt.momentum, nesterov=opt.nesterov)
        self.scaler = LossScaler(enabled=self._amp_dtype() == torch.float16)
        self.comm: collective.GridComm | None = None
        self.grid: Grid | None = None
        self.rank = -1
        self._sync: collective.GradientSynchronizer | None = None
        self._batches = None  # (key, iterator, expected step starts)
        self._train_stream = None  # one loader for the worker's life (train/loader.py)
        self._commits: dict[int, bytes] = {}
        self._digests: dict[int, dict[str, str]] = {}  # per commit (elastic.check_replicas)
        self._relay: WindowRelay | None = None
        self._window_thread: ThreadPoolExecutor | None = None
        self._window_future: Future | None = None
        self._window_ident: int | None = None

    # -- grid membership -------------------------------------------------------------

    def join(self, grid: Grid, rank: int, generation: int, algorithm: str | None = None) -> int:
        """Join the row, column and world groups of ``grid`` as ``rank``; ``algorithm``
        is the grid's all-reduce where the controller chose it (collective.algorithm=auto)."""
        c = self._config.collective
        # Forming waits for the slowest member, which may be a loaded machine's; give it
        # more room than a single collective call gets.
        self.comm = collective.join_grid(grid, rank, generation, timeout_s=c.timeout_s,
                                         rendezvous_timeout_s=max(4 * c.timeout_s, 30.0),
                                         backend=_grid_backend(self._config))
        self.grid, self.rank = grid, rank
        if self._sync is not None:  # joined again without leaving: drop the old hooks
            self._sync.close()
        synchronizer = (collective.OverlappedSynchronizer if c.overlap
                        else collective.GradientSynchronizer)
        self._sync = synchronizer(
            [p for p in self.model.parameters() if p.requires_grad], self.comm,
            algorithm or c.algorithm,
            bucket_bytes=int(c.bucket_mb * 2**20), comm_dtype=_COMM_DTYPES[c.comm_dtype],
            pipeline_chunks=c.pipeline_chunks)
        self._batches = None
        return os.getpid()

    def leave(self) -> None:
        """Leave the current grid's groups (safe after a peer died). Called by the
        controller, it first lets a relayed window still running on the window thread end
        (its collectives are aborted by then), so that nothing of it runs on after the
        rollback or into the next grid."""
        self._await_window()
        if self._sync is not None:
            self._sync.close()  # hooks off; a bucket still in flight is aborted
        if self.comm is not None:
            collective.leave_grid(self.comm)
        self.comm, self._sync, self._batches = None, None, None

    # The control concurrency group runs beside a blocked step (the actor is created with
    # ``concurrency_groups={CONTROL_GROUP: 1}``): the controller reaches a worker that
    # waits inside a collective for a peer that is already dead.
    @ray.method(concurrency_group=CONTROL_GROUP)
    def abort_collectives(self, generation: int, reason: str) -> bool:
        """Fail this worker's pending and later collectives of grid ``generation`` at once,
        and its joining of that grid if it is still forming (a member died: the step or
        the forming cannot complete). Other generations are left alone."""
        collective.abort_forming(generation, reason)
        comm = self.comm
        if comm is None or comm.generation != generation:
            return False
        return collective.abort_grid(comm, reason) > 0

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    # -- training --------------------------------------------------------------------

    def train_step(self, plan: StepPlan) -> StepResult:
        """Train this rank's share of ``plan`` and apply the synchronised update."""
        assert self.grid is not None and self._sync is not None, "join a grid first"
        self._maybe_stall(plan.global_step)
        started = time.perf_counter()
        images, labels = self._next_batch(plan)
        self.model.train()
        # The gradients live in the synchronizer's buckets and are zeroed in place; on
        # one worker there are no buckets, and autograd allocates them as in a plain loop.
        self.optimizer.zero_grad(set_to_none=self._sync.identity)
        loss, correct = None, None
        data_ready = time.perf_counter()
        # An injected death "in the all-reduce" happens before any bucket leaves: with
        # overlap the buckets go during the backward, and a death after them would let
        # the peers finish the step instead of blocking inside the collective.
        self._maybe_die("allreduce", plan.global_step)
        try:
            # With collective.overlap each bucket's all-reduce starts in the backward.
            self._sync.begin(op="sum")
            if len(labels):
                with torch.autocast(self.device.type, dtype=self._amp_dtype() or torch.float32,
                                    enabled=self._amp_dtype() is not None):
                    outputs = self.model(images)
                    loss = self.task.loss(outputs, labels,
                                          label_smoothing=self._config.schedule.label_smoothing)
                # Weight b_r / B: summing the weighted local means over workers gives the
                # mean over the global batch, however unevenly it was split.
                self.scaler.scale(loss * (len(labels) / plan.batch)).backward()
                # Kept on the device: read once, after the optimizer (no sync mid-step).
                correct = self.task.num_correct(outputs, labels)
        except collective.CollectiveError:
            self.leave()  # a bucket's all-reduce failed in the backward: as after sync below
            raise
        except BaseException:
            self._sync.cancel()
            raise
        for param in self.model.parameters():
            if param.requires_grad and param.grad is None:  # an empty share still syncs zeros
                param.grad = torch.zeros_like(param)
        computed = time.perf_counter()
        try:
            with collective.SyncClock(self.device) as exposed:
                self._sync.sync(op="sum")
        except Exception:
            # Tear this worker's groups down at once: closing its connections fails the
            # peers still waiting on it, so a death ripples through the grid in
            # milliseconds instead of every worker sitting out the collective timeout.
            self.leave()
            raise
        synced = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = plan.lr
        try:  # with fp16 the ranks agree on skipping an overflowed step: one more collective
            self.scaler.step(self.optimizer, self.comm, plan.global_step)
        except collective.CollectiveError:
            self.leave()  # as after the gradient sync above
            raise
        stepped = time.perf_counter()
        loss_sum, correct = _read_metrics(loss, correct, len(labels))
        return StepResult(plan.global_step, self.rank, len(labels), loss_sum, correct,
                          compute_s=(computed - data_ready) + (stepped - synced),
                          sync_s=self._sync.comm_seconds, skipped=self._step_skipped,
                          data_wait_s=data_ready - started, comm_exposed_s=exposed.seconds)

    def train_window(self, plans: list[StepPlan], commit: bool = False) -> list[StepResult]:
        """Train the steps of ``plans`` one after the other (a window: the steps up to the
        next commit, epoch or checkpoint boundary, see
        :func:`~flashtrain.train.clock.plan_window`), without the driver between them;
        with ``commit``, then commit the state after the last one (:meth:`commit`), which
        spares the driver a second call to every worker per window.

        Every rank of the grid gets the same plans, so their collectives pair up step by
        step. A failure ends the window at once (train_step has already left the grid, so
        the peers' collectives fail too); the exception carries ``window_step``, the global
        step it ended in, for the driver's account of the work lost.
        """
        results = []
        for plan in plans:
            began = time.perf_counter()
            try:
                result = self.train_step(plan)
            except Exception as err:
                err.window_step = plan.global_step
                raise
            results.append(dataclasses.replace(result, seconds=time.perf_counter() - began,
                                               finished_at=time.time()))
        if commit and plans:
            try:
                self.commit(plans[-1].global_step + 1)
            except Exception as err:
                err.window_step = plans[-1].global_step + 1
                raise
            if self._config.elastic.check_replicas:  # the digest rides on the answer
                digest = self.replica_digest(plans[-1].global_step + 1)
                results[-1] = dataclasses.replace(results[-1], replicas=((digest, (self.rank,)),))
        return results

    def set_relay(self, relay: WindowRelay) -> None:
        """This member's place in the relay tree of the current grid (see
        :mod:`flashtrain.train.relay`)."""
        self._relay = relay

    @ray.method(concurrency_group=RELAY_GROUP)
    def relay_window(self, generation: int, plans: list[StepPlan], commit: bool,
                     timeout: float) -> WindowAnswer:
        """Relay the window to this member's children in the tree and train it here, on
        this member's window thread; the subtree's merged answer. Runs in the relay
        concurrency group (the driver calls no other training method meanwhile)."""
        relay = self._relay
        if relay is None or relay.generation != generation:
            held = None if relay is None else relay.generation
            raise RuntimeError(f"rank {self.rank}: relay_window for grid generation "
                               f"{generation}, but this member's relay tree is of {held}")
        if self._window_thread is None:  # one thread for every relayed window: CUDA
            # and cuBLAS keep per-thread state, so the same thread trains each time
            self._window_thread = ThreadPoolExecutor(max_workers=1,
                                                     thread_name_prefix="flashtrain-window")

        def start_own():
            self._window_future = self._window_thread.submit(self._own_window, plans, commit)
            return self._window_future

        return relay.run(start_own, plans, commit, timeout)

    def _own_window(self, plans: list[StepPlan], commit: bool) -> list[StepResult]:
        self._window_ident = threading.get_ident()
        return self.train_window(plans, commit)

    def _await_window(self) -> None:
        """Wait (bounded) for a relayed window still running on the window thread: when
        a relay above this member died, nobody waits for it but this."""
        future = self._window_future
        if future is None or future.done() or threading.get_ident() == self._window_ident:
            return
        wait_futures([future], timeout=self._config.collective.timeout_s + WINDOW_GRACE_S)

    def _next_batch(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's samples of ``plan``; the data stream is rebuilt from the plan's
        cursor whenever it is not already there (new epoch, new grid, rollback).

        Samples whose image cannot be decoded are left out and kept in
        ``self._step_skipped`` for the step's result. ``train_step`` still weights the
        loss by ``len(labels) / plan.batch``, dividing by the *planned* batch: a skipped
        sample just contributes no gradient. Dividing by the step's decoded count
        instead would need every rank to learn the others' skips (one more collective)
        before its backward pass, for a difference of one sample in a batch.
        """
        self._step_skipped: tuple[SkippedSample, ...] = ()
        key = (plan.epoch, self.grid, self.rank, plan.global_batch)
        if self._batches is None or self._batches[0] != key or self._batches[2] != plan.cursor:
            sampler = StepBatchSampler(
                num_samples=plan.num_samples, epoch=plan.epoch, start_cursor=plan.cursor,
                global_batch=plan.global_batch, num_workers=self.grid.num_workers,
                rank=self.rank, seed=plan.seed, min_tail=plan.min_tail)
            if self._train_stream is None:
                self._train_stream = make_train_stream(self.train_set, self._config.data,
                                                       self.device, self.task.collate)
            self._batches = [key, self._train_stream.start(sampler), plan.cursor]
        step, batch = next(self._batches[1])
        if (step.cursor, step.batch) != (plan.cursor, plan.batch):
            raise RuntimeError(f"rank {self.rank}: data stream at step {(step.cursor, step.batch)}"
                               f", the plan wants {(plan.cursor, plan.batch)}")
        self._batches[2] = step.end_cursor
        if batch is None:  # this rank's share of a tiny tail step is empty
            return torch.empty(0, device=self.device), torch.empty(0, dtype=torch.long)
        images, labels, skipped = batch
        self._step_skipped = tuple(dataclasses.replace(s, rank=self.rank) for s in skipped)
        return to_device(images, self.device), to_device(labels, self.device)

    def _amp_dtype(self) -> torch.dtype | None:
        if self._config.model.precision == "fp32":  # CPU autocast does fp16 and bf16 too
            return None
        return torch.bfloat16 if self._config.model.precision == "bf16" else torch.float16

    # -- evaluation and state ----------------------------------------------------------

    def average_buffers(self) -> None:
        """Average BatchNorm running statistics over all workers, so every replica (and
        the checkpoint) holds the same model."""
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        if not buffers or self.comm is None:
            return
        flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
        collective.allreduce_(flat, self.comm, algorithm="flat", op="mean")
        offset = 0
        for buffer in buffers:
            buffer.copy_(flat[offset:offset + buffer.numel()].view_as(buffer))
            offset += buffer.numel()

    @torch.no_grad()
    def validate(self, batch_size: int = 256) -> dict:
        """Sums over this rank's slice of the validation set: the task's metrics, the loss
        and the sample count, and how many samples could not be decoded (``skipped``,
        not in ``count``). The driver adds them up over the ranks."""
        self.average_buffers()
        self.model.eval()
        count = skipped = 0
        loss_sum = 0.0
        sums: dict[str, float] = {}
        for inputs, targets, undecodable in make_val_loader(
                self.val_set, self.rank, self.grid.num_workers, batch_size, self.task.collate):
            skipped += len(undecodable)
            if not len(targets):
                continue
            inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
            outputs = self.model(inputs)
            loss_sum += float(self.task.loss(outputs, targets, label_smoothing=0.0)) * len(targets)
            for name, value in self.task.metrics(outputs, targets).items():
                sums[name] = sums.get(name, 0.0) + float(value)
            count += len(targets)
        return {"metrics": sums, "count": count, "loss_sum": loss_sum, "skipped": skipped}

    def state(self) -> dict:
        """Model and optimizer state on the CPU (for checkpoints and newcomers)."""
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "scaler": self.scaler.state_dict(),
        }

    def load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._batches = None

    def commit(self, step: int) -> int:
        """Keep an in-memory copy of the state as of global step ``step``; returns its
        size in bytes. The previous commit is kept too: if a worker dies during a commit,
        the clock still points at the previous one and every survivor can return to it."""
        self._maybe_perturb(step)
        buffer = io.BytesIO()
        torch.save(self.state(), buffer)
        checksums = (replica_checksums(self.model, self.optimizer, self.scaler.state_dict())
                     if self._config.elastic.check_replicas else {})
        self._maybe_die("commit", step)
        self._commits[step], self._digests[step] = buffer.getvalue(), checksums
        for old in sorted(self._commits)[:-2]:
            del self._commits[old], self._digests[old]
        return len(self._commits[step])

    def replica_digest(self, step: int, detail: bool = False) -> str | dict[str, str]:
        """The digest of this member's commit of ``step`` (see
        :mod:`flashtrain.train.replicas`); with ``detail``, its per-tensor checksums."""
        if step not in self._digests:
            raise RuntimeError(f"rank {self.rank} holds commits {sorted(self._commits)}, "
                               f"not step {step}")
        return dict(self._digests[step]) if detail else digest_of(self._digests[step])

    def committed_state(self, step: int) -> dict:
        if step not in self._commits:
            raise RuntimeError(f"rank {self.rank} holds commits {sorted(self._commits)}, "
                               f"not step {step}")
        return torch.load(io.BytesIO(self._commits[step]), weights_only=False)

    def rollback(self, step: int) -> None:
        """Return to the commit of global step ``step``."""
        self.load_state(self.committed_state(step))

    def arm_exit(self, where: str, step: int) -> None:
        """Fault injection: end this process at ``where`` ("allreduce": as the step's
        gradient all-reduce begins, so the peers are blocked inside the collective;
        "commit": in the middle of the commit of ``step``)."""
        self._armed_exit = (where, step)

    def _maybe_die(self, where: str, step: int) -> None:
        armed = getattr(self, "_armed_exit", None)
        if armed is not None and armed[0] == where and step >= armed[1]:
            os._exit(1)

    def arm_nonfinite_grad(self, step: int) -> None:
        """Fault injection for tests: at global step ``step`` this rank finds an inf in its
        gradients (fp16 only); every rank must then skip the step."""
        self.scaler.arm_nonfinite(step)

    def arm_perturb(self, step: int) -> str:
        """Fault injection: as the commit of global step ``step`` (or the first after it)
        begins, change one element of this rank's first parameter by a rounding error's
        worth, as silently diverged replicas would; returns that parameter's name."""
        name = next(name for name, _ in self.model.named_parameters())
        self._armed_perturb = (step, name)
        return name

    def _maybe_perturb(self, step: int) -> None:
        armed = getattr(self, "_armed_perturb", None)
        if armed is not None and step >= armed[0]:
            self._armed_perturb = None
            with torch.no_grad():
                param = dict(self.model.named_parameters())[armed[1]]
                param.view(-1)[0] += 1e-6 * (1.0 + param.view(-1)[0].abs())

    def arm_stall(self, step: int, seconds: float) -> None:
        """Fault injection: block this worker for ``seconds`` as global step ``step``
        begins (its peers then wait for its gradients until the collective timeout)."""
        self._armed_stall = (step, seconds)

    def _maybe_stall(self, step: int) -> None:
        armed = getattr(self, "_armed_stall", None)
        if armed is not None and step >= armed[0]:
            self._armed_stall = None
            time.sleep(armed[1])

    def ping(self) -> bool:
        return True


def _read_metrics(loss: torch.Tensor | None, correct: torch.Tensor | None,
                  count: int) -> tuple[float, int | None]:
    """The step's loss sum and correct count as Python numbers: one device-to-host read
    for both (on a GPU the step's only sync besides fp16's overflow vote and the
    exposed-communication timer)."""
    if loss is None:
        return 0.0, 0
    if correct is None:  # the task has no notion of a right answer (regression)
        return float(loss.detach()) * count, None
    mean, hits = torch.stack([loss.detach().float(), correct.float()]).tolist()
    return mean * count, int(hits)


def _grid_backend(config: FlashtrainConfig) -> str:
    """The collective backend of :func:`~flashtrain.collective.join_grid` for ``config``."""
    if not config.grid.use_gpu:
        return "gloo"
    return "nccl" if config.collective.gpu_backend == "flashtrain" else "ray_nccl"


def _to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return copy.deepcopy(value)
