"""The run report (report.html) of a tiny trained run, its numbers, and the HTML pages opened in headless
Chromium: every image on the run report and on an explain page must load (issue 6)."""

import json
import re
import shutil
import signal
import subprocess

import matplotlib
import pytest

from reslab.analysis.html import Page
from reslab.analysis.report import layer_gradient_norms
from reslab.checkpoint import load_checkpoint
from reslab.cli import main
from reslab.train import TrainConfig, fit
from tests.data.fixtures import write_mnist_like
from tests.train.test_eval_predict import TINY

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary on PATH (`make chromium` installs Debian's package)"
)


@pytest.fixture(scope="module")
def tiny_fashion(tmp_path_factory):
    """80 test images (8 a class): fewer than the report's sample, so its image grids see the whole test set."""
    return write_mnist_like(tmp_path_factory.mktemp("tiny-fashion"), n_train=320, n_test=80)


@pytest.fixture(scope="module")
def run(tiny_fashion, tmp_path_factory):
    """A ResNet-8 trained two epochs with `reslab train`, which writes report.html at its end."""
    run = tmp_path_factory.mktemp("report") / "run"
    assert main(["train", *TINY, "--epochs", "2", "--data-dir", str(tiny_fashion), "--out-dir", str(run)]) == 0
    return run


def test_training_writes_a_report_with_the_runs_numbers(run):
    page = (run / "report.html").read_text()
    results = json.loads((run / "results.json").read_text())
    assert f"Test set: {results['test_acc']:.2%} of 80 images" in page
    for name, acc in results["test_per_class_acc"].items():  # the report's evaluation is the training's
        assert f"<td>{name}</td><td>{acc:.2%}</td><td>8</td>" in page
    # The grids' predictions (report.predict) agree with evaluate_checkpoint's confusion matrix.
    confusion = json.loads((run / "eval_test.json").read_text())["confusion_matrix"]
    wrong = 80 - sum(confusion[i][i] for i in range(10))
    assert f"{wrong} of these 80 randomly drawn test images are misclassified" in page
    figures = ["curves.png", "lr.png", "confusion_test.png", "test_predictions.png", "grad_norms.png"]
    figures += ["test_misclassified.png"] if wrong else []
    assert all((run / f).stat().st_size > 5000 for f in figures)
    assert page.count("<img ") == len(figures) and page.count("data:image/png;base64,") == len(figures)
    assert "<td>model_args</td><td>{&quot;layers&quot;: [1, 1, 1]}</td>" in page


def test_gradient_norms_per_layer_and_epoch(run):
    best = load_checkpoint(run / "best.pt")
    records = [json.loads(line) for line in (run / "grad_norms.jsonl").read_text().splitlines()]
    assert records == best["grad_norms"] and [r["epoch"] for r in records] == [0, 1]
    assert set(records[0]["norms"]) == {k for k in best["model"] if "running" not in k and "num_batches" not in k}
    layers, norms = layer_gradient_norms(records, best["model"])
    # ResNet-8 has 8 weighted layers (He et al. count depth so): the stem, two convs in each of 3 blocks, fc.
    assert layers[0] == "conv1.weight" and layers[-1] == "fc.weight" and len(layers) == 8
    assert norms.shape == (8, 2) and (norms > 0).all()
    assert norms[-1, 0] == records[0]["norms"]["fc.weight"]


def test_report_command_rebuilds_the_same_page(run, capsys):
    written = (run / "report.html").read_text()
    (run / "report.html").unlink()
    assert main(["report", str(run), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run / 'report.html'}"
    assert (run / "report.html").read_text() == written


def test_report_of_a_folder_without_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no best.pt" in err and err.startswith("reslab: error:")


def test_gradient_norms_of_a_resumed_run_are_an_uninterrupted_ones(tiny_fashion, tmp_path, signal_at_step):
    def config(name):
        return TrainConfig(
            model="resnet20",
            model_args={"layers": [1, 1, 1]},
            dataset="fashion-mnist",
            data_dir=str(tiny_fashion),
            download=False,
            epochs=2,
            batch_size=64,  # 4 steps an epoch: the norms are compared, not learned
            lr=0.05,
            device="cpu",
            quiet=True,
            out_dir=str(tmp_path / name),
        )

    fit(config("straight"))
    signal_at_step(6, signal.SIGINT)  # 4 steps an epoch: Ctrl-C during step 2 of the second, a partial epoch
    with pytest.raises(KeyboardInterrupt):
        fit(config("cut"))
    signal_at_step(None)
    fit(config("cut"), resume=tmp_path / "cut" / "last.pt")
    straight, cut = (load_checkpoint(tmp_path / name / "last.pt")["grad_norms"] for name in ("straight", "cut"))
    assert [r["epoch"] for r in cut] == [0, 1] and cut == straight
    lines = (tmp_path / "cut" / "grad_norms.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == straight


# --- the pages in a browser -----------------------------------------------------------------------------------
# A script appended to a copy of the page writes, once the page has loaded, how many <img> elements it has and
# how many of them decoded (complete, with a width); Chromium's --dump-dom prints the DOM after it ran.
_IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((image) => image.complete && image.naturalWidth > 0).length;
  document.body.insertAdjacentHTML("beforeend", `<p id="image-check">images=${images.length} loaded=${loaded}</p>`);
});
</script>"""


def images_in_chromium(page, tmp_path) -> tuple[int, int]:
    """(images on the page, images that loaded), as headless Chromium sees ``page``."""
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("</body>", _IMAGE_CHECK + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium-profile'}"]
    cmd = [CHROMIUM, *flags, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    found = re.search(r'<p id="image-check">images=(\d+) loaded=(\d+)</p>', result.stdout)
    assert found, f"Chromium printed no image check (exit {result.returncode}): {result.stderr[-2000:]}"
    return int(found[1]), int(found[2])


def _small_png(path):
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1, 2], [1, 0.5, 0.25])
    fig.savefig(path, dpi=50)
    plt.close(fig)
    return path


@needs_chromium
def test_every_image_of_the_run_report_loads_in_chromium(run, tmp_path):
    page = run / "report.html"
    assert images_in_chromium(page, tmp_path) == (page.read_text().count("<img "), page.read_text().count("<img "))
    assert page.read_text().count("<img ") >= 5


@needs_chromium
def test_every_image_of_an_explain_page_loads_in_chromium(tmp_path):
    from reslab.explain.common import save

    figures = [_small_png(tmp_path / "one.png"), _small_png(tmp_path / "two.png")]
    provenance = {"command": "reslab explain demo", "commit": None, "date": None, "machine": None}
    written = save("demo", {"ratio": 0.5}, figures, ["a ratio of 0.5"], tmp_path / "explain", provenance=provenance)
    assert images_in_chromium(written["html"], tmp_path) == (2, 2)
    assert json.loads(written["json"].read_text())["ratio"] == 0.5


@needs_chromium
def test_the_browser_check_sees_a_broken_image(tmp_path):
    page = Page("one good image, one broken").image(_small_png(tmp_path / "good.png"))
    page.parts.append('<img src="data:image/png;base64,iVBORw0KGgoAAAAA" alt="broken">')
    assert images_in_chromium(page.write(tmp_path / "page.html"), tmp_path) == (2, 1)
