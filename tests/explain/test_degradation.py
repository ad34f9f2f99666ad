"""Degradation: plain and residual twins trained alike (one step count, the same batches) through `reslab train`,
reused, judged by their final errors, and planned from a budget over all four models."""

import math

import pytest

from reslab.checkpoint import load_checkpoint
from reslab.cli import main
from reslab.errors import ReslabError
from reslab.explain import degradation
from tests.data.fixtures import write_mnist_like


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mnist_like(tmp_path_factory.mktemp("fm"), n_train=320, n_test=40)


@pytest.fixture(scope="module")
def result(tmp_path_factory, data):
    runs = tmp_path_factory.mktemp("runs")
    options = dict(depths=[20, 32], steps=5, train_subset=160, runs_dir=str(runs), data_dir=str(data), device="cpu")
    first = degradation.measure(**options)
    second = degradation.measure(**options)
    return first, second, runs, options


def test_every_twin_trains_the_same_steps_on_the_same_batches(result):
    first, _, runs, _ = result
    assert list(first["runs"]) == ["plain20", "resnet20", "plain32", "resnet32"] and first["steps"] == 5
    for name, run in first["runs"].items():
        assert not run["reused"] and run["steps"] == 5
        assert (runs / name / "best.pt").is_file() and (runs / name / "last.pt").is_file()
        assert run["results"]["model"] == name and run["results"]["train_images"] == 5 * 128
        config = load_checkpoint(runs / name / "last.pt")["config"]
        assert config["train_subset"] == 160 and config["warmup_fraction"] == 0.1 and config["steps"] == 5
    # 160 training images are one batch of 128 an epoch: 5 epochs, each of the same batch for every model.
    assert {len(run["history"]) for run in first["runs"].values()} == {5}


def test_a_finished_run_of_the_same_recipe_and_count_is_reused_not_retrained(result):
    first, second, _, _ = result
    for name in first["runs"]:
        assert second["runs"][name]["reused"]
        assert second["runs"][name]["history"] == first["runs"][name]["history"]


def test_the_final_errors_are_of_the_last_weights_on_the_training_subset(result):
    first, _, _, _ = result
    for row in first["table"]:
        p, n = row["train_error"], row["train_images"]
        assert n == 160 and row["train_error_se"] == pytest.approx(math.sqrt(p * (1 - p) / n))
        assert 0 <= row["test_error"] <= 1
    v = first["verdict"]
    rows = {r["model"]: r for r in first["table"]}
    gap = rows["plain32"]["train_error"] - rows["plain20"]["train_error"]
    assert v["plain_deep_minus_shallow_train_error"] == pytest.approx(gap)
    se = math.hypot(rows["plain32"]["train_error_se"], rows["plain20"]["train_error_se"])
    assert v["plain_gap_se"] == pytest.approx(se) and v["plain_degrades"] == (gap > 2 * se)


def test_figure_and_summary(result, tmp_path):
    first, _, _, _ = result
    (png,) = degradation.plot(first, tmp_path)
    assert png.stat().st_size > 10_000
    text = "\n".join(degradation.summarize(first))
    assert "5 steps of 128 images each" in text and "plain-32" in text and "resnet-32 ends" in text


def test_another_seed_trains_again(result):
    _, _, _, options = result
    changed = degradation.measure(**{**options, "seed": 1})
    assert not any(run["reused"] for run in changed["runs"].values())
    assert changed["runs"]["resnet20"]["history"] != result[0]["runs"]["resnet20"]["history"]


def test_a_budget_fixes_one_step_count_for_all_four(data, tmp_path, capsys):
    options = dict(depths=[20, 32], train_subset=160, data_dir=str(data), device="cpu", reference=False)
    result = degradation.measure(budget="40s", runs_dir=str(tmp_path), **options)
    out = capsys.readouterr().out
    steps = result["steps"]
    assert f"budget 40s: {steps} steps of 128 images" in out and "for each of 4 runs" in out
    assert {run["steps"] for run in result["runs"].values()} == {steps} and steps > 5
    # The same budget again reuses the runs (another budget or --train-steps count would train anew).
    assert all(
        run["reused"] for run in degradation.measure(budget="40s", runs_dir=str(tmp_path), **options)["runs"].values()
    )


@pytest.mark.parametrize(
    ("depths", "message"), [([20, 21], "unknown model 'plain21'"), ([20], "at least two different depths")]
)
def test_bad_depths_are_one_clear_error(depths, message):
    with pytest.raises(ReslabError, match=message):
        degradation.measure(depths=depths, runs_dir="unused")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--budget", "ten minutes"], "budget must be a duration"),
        (["--budget", "2s"], "a budget of 2s is too small"),
        (["--train-steps", "0"], "--train-steps must be at least 1"),
    ],
)
def test_bad_budgets_are_one_line_and_write_nothing(data, tmp_path, capsys, flags, message):
    runs = tmp_path / "runs"
    argv = ["explain", "degradation", "--depths", "20", "32", "--train-subset", "160", "--data-dir", str(data)]
    code = main([*argv, "--runs-dir", str(runs), "--out-dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists() and not list(runs.glob("*/last.pt"))
