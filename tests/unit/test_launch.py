"""The batch launcher's pure parts: host lists, the remote-exec template, the command each
host runs, the checks of the command line, and the two batch scripts that call it."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from flashtrain.launch import (
    LaunchError,
    expand_template,
    make_plan,
    node_command,
    parse_args,
    parse_hosts,
    runs_root_of,
)

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)


def plan_for(*argv: str):
    return make_plan(parse_args(["--venv", str(VENV), *argv]))


def test_host_lists_from_a_nodefile_or_scontrol_keep_the_first_order_once():
    assert parse_hosts("hnode003\nhnode001\nhnode003\n\nhnode002\n") == (
        "hnode003", "hnode001", "hnode002")
    assert parse_hosts("a,b, c") == ("a", "b", "c")


def test_the_command_is_one_argument_that_a_shell_runs_unchanged():
    command = "cd '/my dir' && exec python -m x --set 'a=b c'"
    argv = expand_template("ssh -o BatchMode=yes {host} {command}", "hnode002", command)
    assert argv == ["ssh", "-o", "BatchMode=yes", "hnode002", command]
    local = expand_template("bash -c {command}", "ignored", "printf '%s|' \"$0\" 'x y'")
    assert subprocess.run(local, capture_output=True, text=True).stdout == "bash|x y|"


def test_a_template_without_the_command_is_refused_with_an_example():
    with pytest.raises(LaunchError, match=r"no \{command\}.*ssh"):
        expand_template("ssh {host}", "h", "true")


def test_the_head_and_the_workers_run_the_agent_from_the_venv():
    plan = plan_for("--hosts", "h1,h2,h3", "--gpus-per-node", "8",
                    "--setup", "module load python", "--", "--config", "jobs/x.yaml")
    head, worker = (shlex.split(node_command(plan, index).replace("&&", ";")) for index in (0, 2))
    assert plan.head == "h1" and plan.job_args == ("--config", "jobs/x.yaml")
    assert "--head" in head and "--head" not in worker
    for words in (head, worker):
        assert words[words.index(".") + 1] == str(VENV / "bin" / "activate")
        assert ["--num-gpus", "8"] == words[words.index("--num-gpus"):words.index("--num-gpus") + 2]
        assert "module" in words and "--private-ports" not in words
    assert worker[worker.index("--host") + 1] == "h3"
    assert plan.temp_dir(0) != plan.temp_dir(2) and len(plan.temp_dir(0)) < 30


def test_the_dry_run_uses_two_local_nodes_with_private_ports():
    plan = plan_for("--dry-run")
    assert plan.hosts == ("node-0", "node-1") and plan.remote_exec == "bash -c {command}"
    assert "--private-ports" in node_command(plan, 1)


@pytest.mark.parametrize("argv, message", [
    ((), "no hosts"),
    (("--hosts", "a", "--hostfile", "f"), "not both"),
    (("--hostfile", "/nonexistent/nodefile"), "/nonexistent/nodefile"),
    (("--hosts", " , "), "empty"),
    (("--dry-run", "--remote-exec", "ssh {host}"), "no {command}"),
])
def test_bad_command_lines_say_what_to_fix(argv, message):
    with pytest.raises(LaunchError, match=message.replace("{", r"\{").replace("}", r"\}")):
        plan_for(*argv)


def test_a_python_outside_a_venv_is_refused(tmp_path):
    with pytest.raises(LaunchError, match="not a virtual environment"):
        make_plan(parse_args(["--dry-run", "--venv", str(tmp_path)]))


@pytest.mark.parametrize("script", ["abci/job.sh", "slurm/job.sh"])
def test_batch_scripts_parse_and_hand_over_to_the_shared_launcher(script):
    path = REPO / "cluster" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "exec .venv/bin/python -m flashtrain.launch" in text
    assert "{host}" in text and "{command}" in text


def test_the_abci_script_asks_for_full_h200_nodes_as_abci_3_documents():
    text = (REPO / "cluster" / "abci" / "job.sh").read_text()
    for directive in ("#PBS -q rt_HF", "#PBS -l select=", "#PBS -l walltime=", "#PBS -P ",
                      "#PBS -v USE_SSH=1"):
        assert directive in text, directive
    assert '--hostfile "$PBS_NODEFILE"' in text and "GPUS_PER_NODE=8" in text


def test_the_slurm_script_takes_its_hosts_from_scontrol():
    text = (REPO / "cluster" / "slurm" / "job.sh").read_text()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text



def test_the_job_runs_go_next_to_the_shared_directory(tmp_path):
    # The same folder for every launch of a checkout, so a later batch job's
    # --resume --run-dir NAME finds the run.
    plan = plan_for("--hosts", "a,b", "--workdir", str(tmp_path), "--job-id", "7")
    assert plan.share_dir == tmp_path / "runs" / "launch-7"
    assert runs_root_of(plan) == tmp_path / "runs"
    own = plan_for("--hosts", "a", "--share-dir", str(tmp_path / "scratch" / "j8"))
    assert runs_root_of(own) == tmp_path / "scratch"


def test_a_task_of_the_users_runs_through_flashtrain_run():
    plain = plan_for("--hosts", "h1", "--", "--config", "jobs/x.yaml")
    assert plain.job_command == ["flashtrain.jobs.imagenet", "--config", "jobs/x.yaml"]
    task = plan_for("--hosts", "h1", "--task", "mytask:Regression", "--", "--set", "a.b=1")
    assert task.job_command == ["flashtrain.run", "mytask:Regression", "--set", "a.b=1"]
