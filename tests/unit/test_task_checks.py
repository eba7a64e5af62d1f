"""Bad tasks get one clear message before Ray starts: exit status 2, no run directory.

Each task here is a real file in a temporary folder, run as the shell runs it
(``python -m flashtrain.run MODULE:TASK``, called in-process: nothing it checks needs Ray).
"""

from __future__ import annotations

import textwrap

import pytest

from flashtrain.config import load_config
from flashtrain.run import main as run_main
from flashtrain.task_checks import TaskError, check_task, load_task

GOOD = '''
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import flashtrain


class Good(flashtrain.Task):
    def build_model(self, seed):
        return torch.nn.Linear(3, 1)

    def datasets(self):
        generator = torch.Generator().manual_seed(0)
        x, y = torch.randn(20, 3, generator=generator), torch.randn(20, generator=generator)
        return TensorDataset(x, y), TensorDataset(x[:6], y[:6])

    def loss(self, outputs, targets, label_smoothing):
        return F.mse_loss(outputs.squeeze(1), targets)

    def metrics(self, outputs, targets):
        return {"mse": ((outputs.squeeze(1) - targets) ** 2).sum()}
'''


def write_task(folder, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


def run_bad(tmp_path, monkeypatch, capsys, spec: str) -> str:
    """Run the task ``spec`` from ``tmp_path``: exit status 2, no run directory, no Ray;
    the message it printed."""
    import ray

    if ray.is_initialized():  # the local Ray an integration module of this process left up
        ray.shutdown()
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "bad"
    status = run_main([spec, "--run-dir", str(run_dir), "--set", "grid.shape=1x1"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert not run_dir.exists() and not (tmp_path / "runs").exists()
    assert not ray.is_initialized()
    assert err.startswith("flashtrain: ") and err.count("\n") == 1, err  # one message
    return err


def test_a_good_task_passes_the_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_task(tmp_path, "good_task", GOOD)
    check_task(load_task("good_task:Good"), load_config(None, []))


def test_a_module_that_does_not_import(tmp_path, monkeypatch, capsys):
    err = run_bad(tmp_path, monkeypatch, capsys, "no_such_module:Task")
    assert "no module named 'no_such_module'" in err and "--working-dir" in err


def test_a_module_that_fails_while_importing(tmp_path, monkeypatch, capsys):
    write_task(tmp_path, "broken_import", GOOD + "\n1 / 0\n")
    err = run_bad(tmp_path, monkeypatch, capsys, "broken_import:Good")
    assert "ZeroDivisionError" in err and "broken_import.py" in err


def test_a_name_the_module_does_not_define(tmp_path, monkeypatch, capsys):
    write_task(tmp_path, "misnamed", GOOD)
    err = run_bad(tmp_path, monkeypatch, capsys, "misnamed:Goood")
    assert "has no 'Goood'" in err and "the tasks it defines: Good" in err


def test_a_spec_without_a_colon(tmp_path, monkeypatch, capsys):
    err = run_bad(tmp_path, monkeypatch, capsys, "good_task.Good")
    assert "expected MODULE:TASK" in err


def test_a_factory_that_returns_something_else(tmp_path, monkeypatch, capsys):
    write_task(tmp_path, "wrong_factory", GOOD + "\n\ndef make():\n    return {'model': 1}\n")
    err = run_bad(tmp_path, monkeypatch, capsys, "wrong_factory:make")
    assert "make() returned a dict, not a flashtrain.Task" in err


def test_a_class_that_is_not_a_task(tmp_path, monkeypatch, capsys):
    write_task(tmp_path, "not_a_task", "class Plain:\n    pass\n")
    err = run_bad(tmp_path, monkeypatch, capsys, "not_a_task:Plain")
    assert "not a flashtrain.Task: subclass flashtrain.Task" in err


def test_a_model_factory_that_returns_the_wrong_type(tmp_path, monkeypatch, capsys):
    write_task(tmp_path, "wrong_model", GOOD.replace("return torch.nn.Linear(3, 1)",
                                                      "return [torch.nn.Linear(3, 1)]"))
    err = run_bad(tmp_path, monkeypatch, capsys, "wrong_model:Good")
    assert "build_model(0) returned a list, not a torch.nn.Module" in err


def test_an_iterable_data_set(tmp_path, monkeypatch, capsys):
    source = GOOD + '''

class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from ((torch.zeros(3), torch.zeros(())) for _ in range(4))


class Streaming(Good):
    def datasets(self):
        return Stream(), Good().datasets()[1]
'''
    write_task(tmp_path, "streaming", source)
    err = run_bad(tmp_path, monkeypatch, capsys, "streaming:Streaming")
    assert "training data set (a Stream) is not map-style" in err
    assert "__len__" in err and "exactly once" in err


def test_a_loss_that_is_not_a_scalar(tmp_path, monkeypatch, capsys):
    write_task(tmp_path, "vector_loss", GOOD.replace(
        "return F.mse_loss(outputs.squeeze(1), targets)",
        "return F.mse_loss(outputs.squeeze(1), targets, reduction='none')"))
    err = run_bad(tmp_path, monkeypatch, capsys, "vector_loss:Good")
    assert "loss() returned a tensor of shape [2], not a scalar" in err


def test_a_model_whose_builds_differ(tmp_path, monkeypatch, capsys):
    # numpy's global generator is not the one the engine seeds: each build differs.
    write_task(tmp_path, "unseeded", GOOD.replace(
        "return torch.nn.Linear(3, 1)",
        "import numpy as np\n"
        "        model = torch.nn.Linear(3, 1)\n"
        "        model.weight.data = torch.tensor(np.random.randn(1, 3), dtype=torch.float32)\n"
        "        return model"))
    err = run_bad(tmp_path, monkeypatch, capsys, "unseeded:Good")
    assert "two builds of the model with seed 0 differ (first in 'weight')" in err
    assert "diverge" in err


def test_a_task_raising_in_its_data_sets_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_task(tmp_path, "raising_data", GOOD.replace(
        "generator = torch.Generator().manual_seed(0)", "raise OSError('no such table')"))
    with pytest.raises(TaskError, match=r"datasets\(\) raised OSError: no such table \(.*raising_data.py:"):
        check_task(load_task("raising_data:Good"), load_config(None, []))


def test_the_shipped_tasks_pass_the_checks(tmp_path):
    from flashtrain.tasks.diabetes import DiabetesRegression
    from flashtrain.tasks.images import ImageClassification

    config = load_config(None, ["model.name=tiny_cnn", "data.source=synthetic",
                                "data.synthetic_samples=40"])
    check_task(ImageClassification.from_config(config, tmp_path / "cache"), config)
    check_task(DiabetesRegression(), config)


def test_a_model_that_cannot_take_the_data_is_refused_before_start(tmp_path):
    # AlexNet's pooling cannot take 32x32 images: found by one forward pass in the driver
    # instead of by every worker after the grid formed.
    from flashtrain.tasks.images import ImageClassification

    config = load_config(None, ["model.name=alexnet", "data.source=synthetic",
                                "data.synthetic_samples=40", "data.image_size=32"])
    with pytest.raises(TaskError, match=r"the model's forward raised RuntimeError"):
        check_task(ImageClassification.from_config(config, tmp_path), config)
