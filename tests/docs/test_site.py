"""The documentation site builds with `mkdocs build --strict`, and in headless Chromium every built page loads,
every image on it loads and every internal link reaches a built file and anchor (issue 18).

The site is served over http on localhost (Material's search needs http, not file://). One Chromium process
visits every page in turn, in an iframe of a probe page, and posts what it saw back to the server: one browser
start for the whole site keeps the test within seconds on two cores, and the test waits for the report itself,
not for a time budget that a busy machine can overrun.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from tests.analysis.test_report import CHROMIUM, needs_chromium

ROOT = Path(__file__).resolve().parents[2]
PROBE = "__site_check__.html"
REPORT_SECONDS = 600  # a generous ceiling: about 20 s on an idle 2-core machine, more under load

# Visits each page in an iframe; waits for its images (at most 5 s); records the images that decoded
# (naturalWidth > 0), the resolved href of every link and every element id; prints the records as JSON.
_PROBE_SCRIPT = """
<script>
const pages = %s;
const frame = document.getElementById("frame");
const seen = [];
const sleep = ms => new Promise(done => setTimeout(done, ms));
async function visit(url) {
  const loaded = new Promise(done => { frame.onload = done; });
  frame.src = url;
  await loaded;
  const doc = frame.contentDocument;
  const images = [...doc.images];
  for (let waited = 0; waited < 5000 && !images.every(img => img.complete); waited += 50) await sleep(50);
  seen.push({url: frame.contentWindow.location.href, title: doc.title,
             images: images.map(img => [img.getAttribute("src"), img.naturalWidth]),
             links: [...doc.querySelectorAll("a[href]")].map(a => a.href),
             ids: [...doc.querySelectorAll("[id]")].map(e => e.id)});
}
(async () => {
  for (const url of pages) await visit(url);
  await fetch("/%s", {method: "POST", body: JSON.stringify(seen)});
})();
</script>
"""


def _handler(directory: str, reports: queue.Queue):
    """Serves ``directory``; a POST (the probe's report) goes into ``reports``."""

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=directory, **kwargs)

        def do_POST(self):
            reports.put(self.rfile.read(int(self.headers["Content-Length"])).decode())
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):  # the test's output, not the server's log
            pass

    return Handler


def browse(site: Path, tmp_path: Path) -> tuple[str, list[dict]]:
    """(the served base URL, what Chromium saw on every HTML page of ``site``)."""
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html") if p.name not in (PROBE, "404.html"))
    (site / PROBE).write_text(
        '<!doctype html><html><body><iframe id="frame" width="1200" height="800"></iframe>'
        + _PROBE_SCRIPT % (json.dumps(["/" + p for p in pages]), PROBE)
        + "</body></html>"
    )
    reports: queue.Queue = queue.Queue()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(str(site), reports))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]
    log = tmp_path / "chromium.log"
    with log.open("w") as err:
        browser = subprocess.Popen([CHROMIUM, *flags, f"{base}/{PROBE}"], stdout=err, stderr=err)
    try:
        report = reports.get(timeout=REPORT_SECONDS)
    except queue.Empty:
        report = None
    finally:
        browser.kill()
        browser.wait()
        server.shutdown()
        server.server_close()
    assert report is not None, f"no report from Chromium in {REPORT_SECONDS} s: {log.read_text()[-2000:]}"
    return base, json.loads(report)


def _target(site: Path, path: str) -> Path:
    path = unquote(path).lstrip("/")
    return site / path / "index.html" if path == "" or path.endswith("/") else site / path


def problems(site: Path, base: str, records: list[dict]) -> list[str]:
    """Each page that did not load, image that did not decode and internal link to no built file or anchor."""
    ids = {str(_target(site, urlsplit(r["url"]).path)): set(r["ids"]) for r in records}
    found = []
    for r in records:
        page = r["url"]
        if not r["title"]:
            found.append(f"{page}: did not load")
        found += [f"{page}: image {src} did not load" for src, width in r["images"] if width == 0]
        for link in r["links"]:
            if not link.startswith(base):
                continue  # another site, or javascript:
            parts = urlsplit(link)
            target = _target(site, parts.path)
            if not target.is_file():
                found.append(f"{page}: link {link} reaches no built file")
            elif parts.fragment and str(target) in ids and unquote(parts.fragment) not in ids[str(target)]:
                found.append(f"{page}: link {link} reaches no anchor")
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (`pip install -e '.[docs]'`, as make does)")
    out = tmp_path_factory.mktemp("site") / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr[-4000:]}"
    return out


@needs_chromium
def test_every_page_image_and_internal_link_of_the_site_works_in_chromium(site, tmp_path):
    base, records = browse(site, tmp_path)
    built = {p.relative_to(site).as_posix() for p in site.rglob("*.html")} - {PROBE, "404.html"}
    assert {urlsplit(r["url"]).path.lstrip("/") for r in records} == built
    assert sum(len(r["images"]) for r in records) >= 8  # the Understanding pages' figures, at least
    assert problems(site, base, records) == []


@needs_chromium
def test_the_browser_check_sees_a_broken_image_and_broken_links(tmp_path):
    site = tmp_path / "broken"
    site.mkdir()
    (site / "good.html").write_text('<html><head><title>good</title></head><body id="top"></body></html>')
    (site / "index.html").write_text(
        '<html><head><title>index</title></head><body><img src="missing.png" alt="gone">'
        '<a href="good.html#top">fine</a><a href="good.html#nowhere">bad anchor</a><a href="absent.html">gone</a>'
        "</body></html>"
    )
    base, records = browse(site, tmp_path)
    assert sorted(problems(site, base, records)) == [
        f"{base}/index.html: image missing.png did not load",
        f"{base}/index.html: link {base}/absent.html reaches no built file",
        f"{base}/index.html: link {base}/good.html#nowhere reaches no anchor",
    ]
