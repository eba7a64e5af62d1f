"""The elastic scenarios whose outcome is the control plane's decisions alone, run by the
real driver loop and controller on simulated members (:mod:`flashtrain.sim`), with the
configuration and fault steps of the real-Ray tests they replaced (repeated churn, a
death inside a commit, planned resizes, a warm spare, a node leaving and coming back, too
few workers left, elasticity off). What only real processes show (a SIGKILL from outside,
gloo's abort, a node removed from a real cluster, a stall past the collective timeout)
stays in the integration tier: ``test_elastic.py``, ``test_chaos.py``,
``test_external_kills.py`` and ``bench rehearsal``'s smoke in ``test_bench_tools.py``.

Each run also passes every invariant of the simulator: every epoch trained every sample
exactly once, no committed step lost, replicas identical at every commit, the clock and
the members agree, recoveries bounded, the grid grown back."""

from __future__ import annotations

from flashtrain.sim.costs import CPU_2X2
from flashtrain.sim.faults import Fault, FaultPlan
from flashtrain.sim.group import SimWorkerGroup
from flashtrain.sim.run import SimRecord, run_config, sim_config
from flashtrain.topology import Grid

# test_elastic.py's settings that the decisions depend on: commit every 3 steps, a 4 s
# collective timeout; 12 steps per epoch.
BASE = ("collective.timeout_s=4", "elastic.commit_every_steps=3")


def run_2x2(overrides: list[str], faults: list[Fault], *, epochs: int = 2,
            nodes: int | None = None) -> SimRecord:
    grid = Grid(2, 2)
    config, num_samples = sim_config(grid, BASE + tuple(overrides), epochs)
    return run_config(config, num_samples, grid, CPU_2X2, FaultPlan(faults), nodes=nodes)


def simulate(overrides: list[str], faults: list[Fault], *, epochs: int = 2,
             nodes: int | None = None) -> SimRecord:
    record = run_2x2(overrides, faults, epochs=epochs, nodes=nodes)
    assert record.outcome == "finished", record.outcome
    assert record.ok, record.violations
    assert record.invariants["exactly_once"] and record.invariants["no_committed_step_lost"]
    return record


def killed_at(step: int, where: str = "collective") -> Fault:
    """The last live member dies in ``step`` (as ``faults.kill_worker_at_steps`` does)."""
    return Fault(where, 0, 1.0, 0.5, at_step=step)


def losses(record: SimRecord) -> list[dict]:
    return [r for r in record.recoveries if r["cause"] not in ("grow", "phase")]


def test_repeated_churn_loses_at_most_a_commit_interval_each_time():
    kills = [5, 30, 50, 66]
    record = simulate([], [killed_at(s) for s in kills], epochs=6)
    assert [r["failed_step"] for r in losses(record)] == kills
    assert all(r["failed_step"] - r["resume_step"] <= 3 for r in losses(record))
    # each loss shrinks to 3x1 and the replacement grows it back
    assert [r["new_grid"] for r in record.recoveries] == ["3x1", "2x2"] * len(kills)
    assert record.final_grid == "2x2"


def test_a_death_inside_a_commit_returns_everyone_to_the_commit_before():
    record = simulate([], [killed_at(7, where="commit")])
    first = record.recoveries[0]
    # The window of steps 7-9 commits at 9; a death in that commit: back to step 6.
    assert (first["failed_step"], first["resume_step"], first["new_grid"]) == (9, 6, "3x1")
    assert record.final_grid == "2x2"


def test_planned_resizes_follow_the_schedule_phases_without_losing_a_step():
    phases = ("schedule.phases=[{start_epoch: 0, global_batch: 8, grid: 2x2}, "
              "{start_epoch: 1, global_batch: 8, grid: 1x2}, "
              "{start_epoch: 2, global_batch: 16, grid: 2x2}]")
    record = simulate([phases], [], epochs=5)
    assert [(r["cause"], r["old_grid"], r["new_grid"]) for r in record.recoveries] == \
        [("phase", "2x2", "1x2"), ("grow", "1x2", "2x2")]
    assert all(r["failed_step"] == r["resume_step"] for r in record.recoveries)
    assert record.final_grid == "2x2"


def test_a_node_leaves_mid_epoch_and_the_grid_grows_back_when_it_returns():
    # A whole node (a row of the 2x2: two members) dies in step 7 and its capacity
    # returns 10 s later: 2x2 -> 1x2, back one commit at most, then 2x2 again.
    record = simulate([], [Fault("node", 0, 0.0, 0.5, returns_after_s=10.0, at_step=7)],
                      epochs=6)
    lost, grown = record.recoveries
    assert (lost["old_grid"], lost["new_grid"], lost["failed_step"]) == ("2x2", "1x2", 7)
    assert lost["failed_step"] - lost["resume_step"] <= 3
    assert (grown["cause"], grown["new_grid"]) == ("grow", "2x2")
    assert record.final_grid == "2x2"


def test_a_warm_spare_replaces_the_lost_member_in_the_same_reform():
    # Three nodes of two slots: four members and the spare. Rows may not straddle
    # nodes, so 2 + 1 + 1 workers make a 4x1 grid, and nobody is short.
    record = simulate(["elastic.warm_spares=1"], [killed_at(12)], nodes=3)
    first = record.recoveries[0]
    assert (first["old_grid"], first["new_grid"]) == ("2x2", "4x1")
    assert first["failed_step"] == first["resume_step"] == 12  # it died right after a commit
    # the spare started with the grid: the run did not wait for it past a process start
    assert first["time"] < 60, first


_SUBMIT, _CALL = SimWorkerGroup.submit, SimWorkerGroup.call  # the group's own, not a wrapper


def _driver_calls(monkeypatch, grid: Grid, overrides: list[str]) -> tuple[SimRecord, dict]:
    """A fault-free run of ``grid`` with the training calls the driver itself made
    counted at the seam: windows sent to each member, and windows sent to rank 0 alone to
    relay down the tree."""
    counts = {"submits": 0, "member_calls": 0, "relayed": 0}

    def counting_submit(self, members, method, *args):
        if method == "train_window":
            counts["submits"] += 1
            counts["member_calls"] += len(members)
        return _SUBMIT(self, members, method, *args)

    def counting_call(self, member, method, *args, timeout):
        counts["relayed"] += method == "relay_window"
        return _CALL(self, member, method, *args, timeout=timeout)

    monkeypatch.setattr(SimWorkerGroup, "submit", counting_submit)
    monkeypatch.setattr(SimWorkerGroup, "call", counting_call)
    config, num_samples = sim_config(grid, ("elastic.commit_every_steps=5", *overrides),
                                     epochs=1, steps_per_epoch=20)
    record = run_config(config, num_samples, grid, CPU_2X2, FaultPlan([]))
    assert record.outcome == "finished" and record.ok, (record.outcome, record.violations)
    return record, counts


def test_windows_and_relays_cut_the_drivers_calls(monkeypatch):
    """The protocol of `bench control` at a grid larger than the fan-out: per step, one
    call per member per step; windowed, one per member per window (the steps up to the
    next commit, the commit folded in); relayed, one call a window, to rank 0."""
    grid = Grid(7, 1)
    per_step, a = _driver_calls(monkeypatch, grid, ["runtime.step_windows=false"])
    windowed, b = _driver_calls(monkeypatch, grid, [])
    relayed, c = _driver_calls(monkeypatch, grid, ["runtime.relay_fanout=2"])
    steps = per_step.steps
    assert windowed.steps == relayed.steps == steps > 20
    assert a == {"submits": steps, "member_calls": 7 * steps, "relayed": 0}
    windows = b["submits"]
    # Windows end at commits (every 5 steps), checkpoints (every 10) and the epoch's end.
    assert steps / 5 <= windows <= steps / 5 + 2
    assert b == {"submits": windows, "member_calls": 7 * windows, "relayed": 0}
    assert c == {"submits": 0, "member_calls": 0, "relayed": windows}


def aborted(overrides: list[str], faults: list[Fault]) -> SimRecord:
    record = run_2x2(overrides, faults)
    assert record.outcome.startswith("aborted"), record.outcome
    assert record.ok, record.violations  # an abort the configuration asks for, said why
    return record


def test_below_min_workers_ends_with_a_checkpoint_of_the_last_commit():
    # Every worker required (min_workers=4, no wait): the death in step 8 ends the run,
    # and its last commit (step 6; the periodic checkpoints are every 10 steps) is written
    # from a survivor, so nothing committed is lost to a resume.
    record = aborted(["elastic.min_workers=4", "elastic.wait_for_resources_s=0"],
                     [killed_at(8)])
    assert "3 usable worker(s) < elastic.min_workers=4" in record.outcome
    assert record.invariants["last_commit_saved"]
    assert any("wrote the last commit (step 6)" in line for line in record.trace)


def test_with_elasticity_off_a_death_ends_the_run_and_says_why():
    record = aborted(["elastic.enabled=false"], [killed_at(5)])
    assert "died in step 5 and elastic.enabled is false" in record.outcome
    assert not record.recoveries  # no re-form was tried
    assert record.invariants["last_commit_saved"]
