"""Degradation: plain and residual twins trained alike through `reslab train`, reused, and judged by their numbers."""

import pytest

from reslab.errors import ReslabError
from reslab.explain import degradation
from tests.data.fixtures import write_mnist_like


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    data = write_mnist_like(tmp_path_factory.mktemp("fm"), n_train=320, n_test=40)
    runs = tmp_path_factory.mktemp("runs")
    options = dict(depths=[20, 32], epochs=1, runs_dir=str(runs), data_dir=str(data), device="cpu")
    first = degradation.measure(**options)
    second = degradation.measure(**options)
    return first, second, runs, options


def test_every_twin_is_trained_into_its_own_run_folder(result):
    first, _, runs, _ = result
    assert list(first["runs"]) == ["plain20", "resnet20", "plain32", "resnet32"]
    for name, run in first["runs"].items():
        assert not run["reused"]
        assert (runs / name / "best.pt").is_file() and (runs / name / "last.pt").is_file()
        assert len(run["history"]) == 1 and run["results"]["model"] == name


def test_a_finished_run_of_the_same_recipe_is_reused_not_retrained(result):
    first, second, _, _ = result
    for name in first["runs"]:
        assert second["runs"][name]["reused"]
        assert second["runs"][name]["history"] == first["runs"][name]["history"]


def test_the_verdict_compares_final_training_errors(result):
    first, _, _, _ = result
    runs = first["runs"]

    def err(name):
        return 1 - runs[name]["history"][-1]["train_acc"]

    v = first["verdict"]
    assert v["plain_deep_minus_shallow_train_error"] == pytest.approx(err("plain32") - err("plain20"))
    assert v["resnet_deep_minus_shallow_train_error"] == pytest.approx(err("resnet32") - err("resnet20"))
    assert v["plain_degrades"] == (err("plain32") > err("plain20"))
    rows = {r["model"]: r for r in first["table"]}
    assert rows["resnet20"]["test_error"] == pytest.approx(1 - runs["resnet20"]["results"]["test_acc"])


def test_figure_and_summary(result, tmp_path):
    first, _, _, _ = result
    (png,) = degradation.plot(first, tmp_path)
    assert png.stat().st_size > 10_000
    text = "\n".join(degradation.summarize(first))
    assert "plain-32 ends with" in text and "resnet-32 ends" in text


def test_a_changed_recipe_trains_again(result):
    _, _, _, options = result
    changed = degradation.measure(**{**options, "seed": 1})  # another seed: another recipe, as cheap as the first
    assert not any(run["reused"] for run in changed["runs"].values())
    assert changed["runs"]["resnet20"]["history"] != result[0]["runs"]["resnet20"]["history"]


@pytest.mark.parametrize(
    ("depths", "message"), [([20, 21], "unknown model 'plain21'"), ([20], "at least two different depths")]
)
def test_bad_depths_are_one_clear_error(depths, message):
    with pytest.raises(ReslabError, match=message):
        degradation.measure(depths=depths, runs_dir="unused")
