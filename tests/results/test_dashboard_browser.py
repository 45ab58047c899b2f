"""optuna-dashboard in a real headless browser (Debian's chromium, which .ci/run installs) on a
finished debug study: the study page names the metric and shows the chosen cut, the note holds
the answer, a trial page shows its one-line note, and its checkpoint link downloads the file."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pgserver import free_port, skip_or_fail
from studyutil import kill_group, start_driver

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000", "--virtual-time-budget=20000"]
"""Headless and quiet: this machine has no network beyond the package registries."""
SCREENSHOTS = os.environ.get("TTL_SEARCH_SCREENSHOTS")
"""A folder to keep the screenshots in (for people); by default they stay in the test's tmp folder."""


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        skip_or_fail("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def dashboard(study, tmp_path_factory):
    """`ttl-search dashboard` (read-only, 127.0.0.1) on the session's finished debug study."""
    name, url = study
    root = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    proc = start_driver(["dashboard", "--storage", url, "--port", str(port)], root / "dashboard.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            studies = json.load(urllib.request.urlopen(f"{base}/api/studies", timeout=5))
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                kill_group(proc)
                raise AssertionError(f"the dashboard did not answer: {(root / 'dashboard.log').read_text()[-2000:]}")
            time.sleep(0.5)
    study_id = next(s["study_id"] for s in studies["study_summaries"] if s["study_name"] == name)
    yield {"base": base, "study_id": study_id, "root": root, "name": name, "url": url}
    kill_group(proc)


def render(chromium: str, url: str, root: Path, screenshot: str | None = None) -> str:
    """The page's DOM after its scripts ran (and a PNG of it when ``screenshot`` names one)."""
    profile = root / f"profile-{time.monotonic_ns()}"
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    if screenshot:
        path = Path(SCREENSHOTS or root) / screenshot
        path.parent.mkdir(parents=True, exist_ok=True)
        shot = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}-shot", f"--screenshot={path}",
                               url], capture_output=True, text=True, timeout=180)
        assert shot.returncode == 0 and path.stat().st_size > 10_000, shot.stderr[-2000:]
    return dom.stdout


def _text(dom: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", " ", dom))


def test_the_dashboard_alone_answers_which_cut(chromium, dashboard):
    from ttl_search.results import best_cut
    from ttl_search.search.record import TrialRecord

    best = best_cut(dashboard["name"], dashboard["url"])
    base, sid, root = dashboard["base"], dashboard["study_id"], dashboard["root"]

    page = _text(render(chromium, f"{base}/dashboard/studies/{sid}", root, "study.png"))
    assert "val_auroc" in page  # the metric's name, not "Objective 0"
    # the answer is the first of the study's attributes: on the first page of their table
    lo, hi = best["val_ci"]
    assert f"cut {best['cut']} ({best['cut_name']}): val AUROC" in page and f"[{lo:.4f}, {hi:.4f}]" in page
    assert f"trial {best['trial']}, rule smallest_within_ci" in page

    note = _text(render(chromium, f"{base}/dashboard/studies/{sid}/note", root, "note.png"))
    assert f"Chosen: cut {best['cut']} ({best['cut_name']}), trial {best['trial']}" in note

    trial_page = render(chromium, f"{base}/dashboard/studies/{sid}/trials?numbers={best['trial']}", root,
                        "trial.png")
    text = _text(trial_page)
    assert f"TTL cut {best['cut']} ({best['cut_name']})" in text and "CHOSEN" in text
    links = re.findall(r'href="(/artifacts/\d+/\d+/[0-9a-fA-F-]+)"', trial_page)
    assert links, "the trial page links no artifact"
    body = urllib.request.urlopen(base + html.unescape(links[0]), timeout=30).read()
    from ttl_search.results import open_study

    study, _ = open_study(dashboard["name"], dashboard["url"])
    trial = next(t for t in study.trials if t.number == best["trial"])
    assert body == Path(TrialRecord.from_trial(trial).checkpoint).read_bytes()  # the checkpoint downloads


def test_the_baselines_have_a_study_page_of_their_own(chromium, dashboard):
    """The study's page shows the search alone; its baselines' page says whose they are and shows
    each baseline's one-line note."""
    base, root, name = dashboard["base"], dashboard["root"], dashboard["name"]
    studies = json.load(urllib.request.urlopen(f"{base}/api/studies", timeout=5))["study_summaries"]
    sid = next(s["study_id"] for s in studies if s["study_name"] == f"{name}:baselines")
    note = _text(render(chromium, f"{base}/dashboard/studies/{sid}/note", root, "baselines-note.png"))
    assert re.search(rf"Baselines of study\s+{name}\b", note), note[-3000:]
    pages = [_text(render(chromium, f"{base}/dashboard/studies/{sid}/trials?numbers={n}", root,
                          f"baselines-trial-{n}.png")) for n in (0, 1)]
    assert any("full fine-tuning cut 7" in p for p in pages) and any("linear probe cut 7" in p for p in pages)
