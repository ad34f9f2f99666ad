"""Write the generated blocks of README.md and of the documentation pages (docs/) from the recorded results.

Usage:
    python benchmarks/docs_pages.py                      # rewrite every generated block (make docs-pages)
    python benchmarks/docs_pages.py --check              # exit 1 naming every page and block that is stale
    python benchmarks/docs_pages.py --explain-run DIR [--degradation DIR]
                                                         # first take in a `reslab explain all --out-dir DIR` run

A generated block is the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` in a page. NAME says
what writes it: ``models`` is `reslab models --format markdown`; ``explain:EXPERIMENT`` is what that experiment
printed (the ``summary`` of benchmarks/results/explain/EXPERIMENT.json) with its time and machine;
``explain:times`` the times of `reslab explain all`; every other name is a table of benchmarks/docs_tables.py,
rendered from the JSON file a benchmark wrote, with the command and the machine the file records.
tests/docs/test_pages.py regenerates every block in memory and fails when a page says something else.
``--explain-run`` copies each experiment's JSON to benchmarks/results/explain/ and its figures to docs/explain/.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import docs_tables as tables

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- ([\w:-]+):start -->\n(.*?)<!-- \1:end -->", re.S)
EXPLAIN = ("block", "backprop", "gradients", "degradation", "responses", "lesion", "landscape")
FIGURES = Path("docs/explain")


def explain_block(root: Path, name: str) -> str:
    """What `reslab explain NAME` printed, with its seconds and the machine, from its recorded JSON."""
    record = tables.load(root, f"explain/{name}.json")
    seconds = record.get("seconds")  # a separate run of one experiment records its own time
    if not isinstance(seconds, (int, float)):
        seconds = tables.load(root, "explain/all.json")["seconds"][name]
    command = record["provenance"]["command"]
    by = "" if command == f"reslab explain {name}" else f" (run by `{command}`)"
    lines = [
        f"What `reslab explain {name}` printed in {seconds:,.1f} s{by} on {tables.machine_text(record['provenance'])}:",
        "",
    ]
    lines += [f"- {line.strip()}" for line in record["summary"]]
    return "\n".join(lines) + f"\n\nRecorded in `{tables.RESULTS}/explain/{name}.json`."


def explain_times(root: Path) -> str:
    """Each experiment's seconds in `reslab explain all`, and the separate degradation run."""
    record = tables.load(root, "explain/all.json")
    rows = [[f"`{name}`", f"{s:,.1f}"] for name, s in record["seconds"].items()]
    rows.append(["all", f"**{record['total_seconds']:,.1f}**"])
    degradation = tables.load(root, "explain/degradation.json")
    return (
        tables.table(["experiment", "seconds"], rows)
        + f"\n\n`{record['provenance']['command']}` on {tables.machine_text(record['provenance'])}, "
        f"{record['provenance'].get('date') or 'date not recorded'}; `{tables.RESULTS}/explain/all.json`. In it, "
        "`degradation` only reads the shipped twins' recorded run. A fresh `reslab explain degradation`, which "
        f"trains, took {degradation['seconds']:,.1f} s of its {degradation['budget']} budget on "
        f"{tables.machine_text(degradation['provenance'])}; `{tables.RESULTS}/explain/degradation.json`."
    )


def reference_twins(root: Path) -> str:
    """What training the shipped reference twins printed, from the manifest beside their weights."""
    path = Path("src/reslab/explain/reference_nets/manifest.json")
    record = json.loads((root / path).read_text())
    lines = [
        f"What `{record['command']}` printed in {record['seconds']:,.1f} s on "
        f"{tables.machine_text({'machine': record['machine']})}, commit `{record['commit'][:10]}`:",
        "",
    ]
    lines += [f"- {line.strip()}" for line in record["summary"]]
    return "\n".join(lines) + f"\n\nRecorded in `{path}`."


def models_table(root: Path) -> str:
    """`reslab models --format markdown`."""
    from reslab.cli import models_markdown

    return models_markdown()


def readme_result(root: Path) -> str:
    """README's one measured result: the 180-second recipe's time to accuracy."""
    name = tables.TIME_TO_ACCURACY[0]
    record = tables.load(root, name)
    accs = sorted(r["test_acc"] for r in record["runs"])
    return (
        f"`reslab train --recipe {record['recipe']}` (ResNet-20, {record['train_images']:,} training images) reached "
        f"a median **{tables.pct(record['median_test_acc'])}** test accuracy over seeds "
        f"{', '.join(map(str, record['seeds']))} ({tables.pct(accs[0])} to {tables.pct(accs[-1])}) in a median "
        f"{record['median_seconds']:,.1f} s from start to test result, on "
        f"{tables.machine_text(record['provenance'])}. Measured by "
        f"`{tables._time_to_accuracy_command(record, name)}`; `{tables.RESULTS / name}`."
    )


def demo(root: Path) -> str:
    """What `make demo` took and reached, from benchmarks/demo.py's record of it."""
    record = tables.load(root, "demo_cpu.json")
    run, prov = record["run"], record["provenance"]
    return (
        f"`make demo` took **{record['demo_seconds']} s** after set-up on {tables.machine_text(prov)} "
        f"({prov.get('date') or 'date not recorded'}): {run['steps']:,} steps of the {run['budget']} training budget "
        f"({run['train_images']:,} training images, {run['amp']}), and its best model scored "
        f"**{tables.pct(record['eval_test_accuracy'])}** on the 10,000 test images in `reslab eval`. Recorded by "
        f"`python benchmarks/demo.py`; `{tables.RESULTS}/demo_cpu.json`."
    )


RENDERERS: dict[str, Callable[[Path], str]] = {
    "models": models_table,
    "demo": demo,
    "readme:result": readme_result,
    "explain:times": explain_times,
    **{f"explain:{name}": (lambda root, name=name: explain_block(root, name)) for name in EXPLAIN},
    "reference-twins": reference_twins,
    "reference-accuracy": tables.reference_accuracy,
    "degradation-recipes": tables.degradation_recipes,
    "memory-format": tables.memory_format,
    "transfer": tables.transfer,
    "time-to-accuracy": tables.time_to_accuracy,
    "demo-ablation": tables.demo_ablation,
    "fast-ablations": tables.fast_ablations,
    "tta-gain": tables.tta_gain,
    "throughput": tables.throughput,
    "loop-overhead": tables.loop_overhead,
    "bench": tables.bench,
    "int8-choices": tables.int8_choices,
    "deploy-accuracy": tables.deploy_accuracy,
}


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page of the site."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def regenerate(text: str, root: Path = ROOT, cache: dict[str, str] | None = None) -> str:
    """``text`` with every generated block rendered anew from the JSON files under ``root``."""
    cache = {} if cache is None else cache

    def fill(found: re.Match) -> str:
        name = found[1]
        if name not in RENDERERS:
            raise KeyError(f"no renderer for the block {name!r}; known: {', '.join(RENDERERS)}")
        if name not in cache:
            cache[name] = RENDERERS[name](root)
        return f"<!-- {name}:start -->\n{cache[name]}\n<!-- {name}:end -->"

    return MARKER.sub(fill, text)


def stale(root: Path = ROOT, checked: list[Path] | None = None) -> list[str]:
    """``page: block`` for every generated block that differs from what its JSON says, and ``missing: NAME``
    for every renderer whose block is on no page (a table that lost its page)."""
    cache: dict[str, str] = {}
    problems, seen = [], set()
    for page in checked or pages(root):
        text = page.read_text()
        fresh = dict(MARKER.findall(regenerate(text, root, cache)))
        for name, body in MARKER.findall(text):
            seen.add(name)
            if body != fresh[name]:
                problems.append(f"{page.relative_to(root)}: {name}")
    problems += [f"missing: {name}" for name in RENDERERS if checked is None and name not in seen]
    return problems


def take_explain_run(run: Path, degradation: Path | None, root: Path = ROOT) -> None:
    """Copy a `reslab explain all` run's JSON files and figures to where the pages read them."""
    (root / tables.RESULTS / "explain").mkdir(parents=True, exist_ok=True)
    (root / FIGURES).mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "all.json", root / tables.RESULTS / "explain/all.json")
    for name in EXPLAIN:
        folder = degradation if name == "degradation" and degradation else run / name
        shutil.copy(folder / f"{name}.json", root / tables.RESULTS / f"explain/{name}.json")
        for png in folder.glob("*.png"):
            shutil.copy(png, root / FIGURES / png.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any block is stale")
    parser.add_argument("--explain-run", type=Path, help="a `reslab explain all --out-dir` folder to take in")
    parser.add_argument("--degradation", type=Path, help="a separate `reslab explain degradation` folder")
    args = parser.parse_args()
    if args.check:
        problems = stale()
        for problem in problems:
            print(f"stale: {problem}")
        if problems:
            print("regenerate them: make docs-pages")
        return 1 if problems else 0
    if args.explain_run:
        take_explain_run(args.explain_run, args.degradation)
    cache: dict[str, str] = {}
    for page in pages():
        text = page.read_text()
        new = regenerate(text, ROOT, cache)
        if new != text:
            page.write_text(new)
            print(f"rewrote {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
