"""How a step window or the run ends badly, as the controller tells the trainer:
:class:`StepFailed` (a membership change: re-form), :class:`WorkerError` (worker code
raised: stop), :class:`GridLost` (nobody left: restart from the newest checkpoint),
:class:`ReplicasDiverged` (the members' commits differ: stop), and their base
:class:`ElasticAbort` (the run cannot continue)."""

from __future__ import annotations

from flashtrain.train.clock import StepPlan


class StepFailed(RuntimeError):
    """A step or commit did not complete on every member."""

    def __init__(self, plan: StepPlan | None, cause: BaseException, pending: list | None = None,
                 step: int | None = None, reached: list[int] | None = None):
        # The clock position lost: the plan's step, unless ``step`` says where a window of
        # steps that began at ``plan`` ended.
        self.step = step if step is not None else plan.global_step if plan is not None else None
        where = f"step {self.step}" if plan is not None else f"the commit at step {self.step}"
        super().__init__(f"{where} failed: {type(cause).__name__}: {cause}")
        self.plan = plan
        self.cause = cause
        self.pending = pending or []  # the calls' object refs, some may still be running
        # How far each settled member of a failed window got, when a relay tree collected
        # it (else the trainer reads it from ``pending``).
        self.reached = reached


class ElasticAbort(RuntimeError):
    """The run cannot continue (too few workers for too long, too many re-forms)."""


class ReplicasDiverged(ElasticAbort):
    """The members' commits differ (``elastic.check_replicas``): training on would only
    average the difference in; the run stops, naming the ranks and tensors, and the
    commit before (checked equal) is the last one kept."""

    def __init__(self, step: int, message: str):
        self.step = step
        super().__init__(f"{message} (a bug or a silent hardware fault: the checkpoints "
                         f"before step {step} hold replicas that were checked equal; "
                         "elastic.check_replicas=false skips this check)")


class GridLost(ElasticAbort):
    """Every member of the grid was lost: no in-memory commit survives. The trainer
    continues from the newest durable checkpoint (see :meth:`ElasticController.restart`);
    anyone else sees an abort."""

    def __init__(self, failure: StepFailed):
        self.failure = failure
        super().__init__(f"{failure}: every worker was lost, nothing in memory to continue "
                         "from (resume from the newest checkpoint with --resume)")


class WorkerError(ElasticAbort):
    """Worker code raised (a bug, bad input): not a membership change, so re-forming
    cannot help; the run stops with that worker's error."""

    def __init__(self, rank: int, method: str, cause: BaseException):
        self.rank = rank
        self.method = method
        self.cause = cause
        # A remote call's error (Ray: a RayTaskError) carries the worker's exception; a
        # relay reports its own window's exception itself, with the traceback as text
        # (``traceback_text``).
        inner = getattr(cause, "cause", None) if hasattr(cause, "as_instanceof_cause") else cause
        detail = (f"{type(inner).__name__}: {inner}" if inner is not None
                  else str(cause).strip().splitlines()[-1])
        step = getattr(inner, "window_step", None)  # train_window names the step
        where = f"{method} at step {step}" if step is not None else method
        trace = getattr(inner, "traceback_text", None)
        super().__init__(f"worker rank {rank} raised in {where}: {detail}"
                         + (f"\n{trace}" if trace else ""))
