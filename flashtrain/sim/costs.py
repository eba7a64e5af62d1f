"""What each simulated operation costs, in virtual seconds, from named inputs.

Defaults describe the paper's machine (ABCI, V100s, ResNet-50 at 83 ms a step) and Ray's
control plane as measured on this project: the all-reduce comes from the project's cost
model (:mod:`flashtrain.costmodel`, the 2D torus on the grid in force); group formation
grows with the grid's size (a rendezvous over every member); a replacement's process
start is what the controller measured on the 2-core machine (7.6-10.3 s, see
:mod:`flashtrain.elastic.controller`). Every figure is an input: the validation against
the real 2x2 run passes the ones measured on this machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from flashtrain.costmodel import ABCI, RESNET50_PARAMS, allreduce_time
from flashtrain.topology import Grid


@dataclass(frozen=True)
class SimCosts:
    """Named inputs of the simulator's time model (seconds)."""

    step_compute_s: float = 0.083  # forward + backward + update of one step on a member
    allreduce_bytes: float = RESNET50_PARAMS * 2.0  # fp16 gradients
    fixed_allreduce_s: float | None = None  # overrides the cost model (validation runs)
    call_latency_s: float = 0.002  # one driver -> member call and its answer
    process_start_s: float = 8.0  # a replacement's constructor (imports, model, data)
    form_base_s: float = 0.5  # forming a grid's groups...
    form_per_doubling_s: float = 0.05  # ...and this much more per doubling of its size
    detect_s: float = 0.5  # from a process's death to its callers' errors
    commit_s: float = 0.05  # an in-memory commit (serialising the state)
    handover_s: float = 0.5  # a newcomer loads the committed state
    validate_s: float = 1.0
    checkpoint_s: float = 1.0

    def allreduce_s(self, grid: Grid) -> float:
        if self.fixed_allreduce_s is not None:
            return self.fixed_allreduce_s
        return _torus_s(self.allreduce_bytes, grid.cols, grid.rows)

    def form_s(self, num_workers: int) -> float:
        return self.form_base_s + self.form_per_doubling_s * math.log2(max(num_workers, 1))


@lru_cache(maxsize=4096)
def _torus_s(size_bytes: float, cols: int, rows: int) -> float:
    return allreduce_time("torus", size_bytes, cols, rows, ABCI)


# This project's 2-core machine, the 2x2 CPU default (shufflenet at 32 px, gloo): the
# figures the validation against the real run measures; until then, assumptions.
CPU_2X2 = SimCosts(step_compute_s=0.45, fixed_allreduce_s=0.05, call_latency_s=0.005,
                   process_start_s=8.0, form_base_s=1.0, form_per_doubling_s=0.2,
                   detect_s=0.5, commit_s=0.1, handover_s=0.5, validate_s=2.0,
                   checkpoint_s=1.0)
PAPER = SimCosts()
PRESETS = {"paper": PAPER, "cpu": CPU_2X2}
