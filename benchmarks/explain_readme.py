"""Write what `reslab explain all` measured into README.md and its figures into docs/explain/.

Usage:
    reslab explain all --out-dir explain-all
    python benchmarks/explain_readme.py explain-all [--degradation explain/degradation]

For each experiment, the lines between `<!-- explain:NAME:start -->` and `<!-- explain:NAME:end -->` in
README.md become the summary that the command printed (from NAME/NAME.json), with the time `all.json`
recorded and the machine; its PNG figures are copied to docs/explain/. `--degradation` takes that experiment
from a separate fresh `reslab explain degradation` run (`all` reports the shipped twins' run instead).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

README = Path("README.md")
FIGURES = Path("docs/explain")


def block(name: str, folder: Path, seconds: float | None, machine: str) -> str:
    record = json.loads((folder / f"{name}.json").read_text())
    took = f" in {seconds:.1f} s" if seconds is not None else ""
    lines = [f"What `reslab explain {name}` printed{took} on {machine}:", ""]
    lines += [f"- {line.strip()}" for line in record["summary"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the folder `reslab explain all --out-dir` wrote")
    parser.add_argument("--degradation", default=None, help="a fresh `reslab explain degradation` folder")
    parser.add_argument("--degradation-seconds", type=float, default=None)
    args = parser.parse_args()
    root = Path(args.root)
    record = json.loads((root / "all.json").read_text())
    m = record["machine"]
    machine = f"{m['cores']} cores of an {m['cpu']} ({', '.join(m['cpu_flags'])}), torch {m['torch']}"
    text = README.read_text()
    for name, seconds in record["seconds"].items():
        folder = root / name
        if name == "degradation" and args.degradation:
            folder, seconds = Path(args.degradation), args.degradation_seconds
        pattern = re.compile(rf"(<!-- explain:{name}:start -->\n).*?(<!-- explain:{name}:end -->)", re.S)
        if pattern.search(text):
            body = block(name, folder, seconds, machine)
            text = pattern.sub(lambda found, body=body: found.group(1) + body + "\n" + found.group(2), text)
        FIGURES.mkdir(parents=True, exist_ok=True)
        for png in folder.glob("*.png"):
            shutil.copy(png, FIGURES / png.name)
    README.write_text(text)
    print(f"README.md and {FIGURES} updated from {root}")


if __name__ == "__main__":
    main()
