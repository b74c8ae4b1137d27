"""Watching a search: `evomerge status` on finished, running, interrupted, crashed and broken
run directories; the report's parents, rescored trials and self-reload while live;
`report --watch`; the progress line of a resumed finished run; the report in a real browser."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from evomerge.search.loop.driver import run_search
from evomerge.search.loop.workers import SerialExecutor
from evomerge.search.outputs.report import watch_report, write_report
from evomerge.search.run.rundir import RunDir
from evomerge.search.watch.status import run_status
from tests.conftest import Stop, search_config, stopping_after

CHROMIUM = "/usr/bin/chromium"


def _search(path, cfg, stop_after=None):
    run = RunDir.create(path, cfg)
    with contextlib.suppress(Stop):
        run_search(run, lambda: SerialExecutor(cfg), stopping_after(stop_after))
    return run


@pytest.fixture(scope="module")
def runs(tiny_zoo, tmp_path_factory):
    """runs/done (finished, the winner rescored) and runs/cut (killed after 5 of 8)."""
    root = tmp_path_factory.mktemp("watch")
    cfg = search_config(
        tiny_zoo,
        cma={"popsize": 4, "budget": 8, "seed": 3, "sigma0": 0.3},
        fitness={**search_config(tiny_zoo).fitness.model_dump(), "rescore": {"top": 1}},
    )
    _search(root / "runs" / "done", cfg)
    _search(root / "runs" / "cut", cfg, stop_after=5)
    return root


def _copy(runs: Path, name: str, to: Path) -> Path:
    shutil.copytree(runs / "runs" / name, to)
    return to


def _cli(*args, cwd=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "evomerge.search.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        **kw,
    )


# -- evomerge status ------------------------------------------------------------------------


def test_status_of_finished_running_interrupted_crashed_and_broken_runs(runs, tmp_path):
    root = tmp_path / "w"
    (root / "runs").mkdir(parents=True)
    _copy(runs, "done", root / "runs" / "finished")
    _copy(runs, "cut", root / "runs" / "crashed")
    _copy(runs, "cut", root / "runs" / "live")
    interrupted = _copy(runs, "cut", root / "runs" / "stopped")
    RunDir.reopen(interrupted).log("interrupted by SIGINT")
    (root / "runs" / "junk").mkdir()
    (root / "runs" / "junk" / "notes.txt").write_text("not a run")
    (root / "runs" / "broken").mkdir()
    (root / "runs" / "broken" / "run.yaml").write_text("format: evomerge-run/1\nconfig: [1, 2\n")
    live = RunDir.reopen(root / "runs" / "live")
    with live.lock():  # a search holding the run, as `evomerge search` does
        res = _cli("status", cwd=root)  # default: every directory under runs/
        names = sorted(f"runs/{p.name}" for p in (root / "runs").iterdir())  # as runs/* gives
        explicit = _cli("status", *names, cwd=root)
    assert res.returncode == 0, res.stderr
    assert explicit.returncode == 0, explicit.stderr
    rows = {}
    for line in res.stdout.splitlines():
        m = re.match(r"\W*(runs/\w+)\s*\W\s*(.*)", line)
        if m:
            rows[m.group(1).split("/")[1]] = m.group(2)
    assert set(rows) == {"finished", "crashed", "live", "stopped", "junk", "broken"}, res.stdout
    assert rows["finished"].startswith("finished") and "8/8" in rows["finished"]
    assert "rescored" in rows["finished"]
    assert rows["live"].startswith("running: pid") and "5/8" in rows["live"]
    assert rows["crashed"].startswith("crashed") and "5/8" in rows["crashed"]
    assert rows["stopped"].startswith("interrupted") and "SIGINT" in rows["stopped"]
    assert rows["junk"].startswith("not a run") and "no run.yaml" in rows["junk"]
    assert rows["broken"].startswith("unreadable")
    for name in ("finished", "crashed", "live", "stopped"):
        assert f"runs/{name}" in explicit.stdout


def test_status_numbers(runs, tmp_path):
    done = run_status(runs / "runs" / "done")
    trials = RunDir.reopen(runs / "runs" / "done").trials()
    finished = [t for t in trials.values() if t["status"] in ("COMPLETE", "FAILED")]
    assert (done.state, done.done, done.budget) == ("finished", 8, 8)
    assert done.failures == sum(t["status"] == "FAILED" for t in finished)
    gen2 = [t["fitness"] for t in finished if t["generation"] == 2 and t["status"] == "COMPLETE"]
    assert done.last_generation == 2 and done.last_mean == pytest.approx(sum(gen2) / len(gen2))
    assert done.rescored is not None and done.best_parent == max(
        v["fitness"] for v in RunDir.reopen(runs / "runs" / "done").parents().values()
    )
    records = RunDir.reopen(runs / "runs" / "done").records()
    times = sorted(r["time"] for r in records if "time" in r)  # rescoring annotations: no time
    assert done.elapsed == pytest.approx(times[-1] - times[0])
    assert done.eta is None

    live = RunDir.reopen(_copy(runs, "cut", tmp_path / "live"))
    with live.lock():
        s = run_status(live.path)
    assert s.state == "running" and s.done == 5
    assert s.eta is not None and s.eta > 0  # 3 evaluations to go at the recent rate

    # a lock held on another host cannot be seen from here: a fresh journal says running,
    # a stale one crashed
    other = _copy(runs, "cut", tmp_path / "other")
    (other / "run.lock").write_text("pid 4242 on node-17 since 2026-01-01 00:00:00\n")
    last = max(r["time"] for r in RunDir.reopen(other).records() if "time" in r)
    assert run_status(other, now=last + 60).state == "running"
    assert "node-17" in run_status(other, now=last + 60).detail
    assert run_status(other, now=last + 86400).state == "crashed"


def test_status_without_runs_is_one_line_exit_2(tmp_path):
    res = _cli("status", cwd=tmp_path)
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "runs/" in lines[0]
    res = _cli("status", str(tmp_path / "missing"), cwd=tmp_path)
    assert res.returncode == 0 and "not found" in res.stdout


# -- the report -----------------------------------------------------------------------------


def test_report_shows_parents_rescored_and_reloads_only_while_live(runs, tmp_path):
    done = _copy(runs, "done", tmp_path / "done")
    page = (write_report(done, refresh=7) / "index.html").read_text()
    assert 'http-equiv="refresh"' not in page  # finished: the page stays still
    assert "best and parents (search split)" in page
    for parent in ("parent base", "parent add", "parent caps"):
        assert parent in page
    run = RunDir.reopen(done)
    winner = run.ranked()[0]
    assert f"{winner['rescored']['fitness']:.4f}" in page
    assert "rescored at the end" in page and "finished" in page

    live = RunDir.reopen(_copy(runs, "cut", tmp_path / "live"))
    with live.lock():
        page = (write_report(live.path, refresh=7) / "index.html").read_text()
    assert '<meta http-equiv="refresh" content="7">' in page
    assert "running" in page and "5/8" in page


def test_watch_rewrites_while_live_and_stops_when_the_run_ends(runs, tmp_path):
    path = _copy(runs, "done", tmp_path / "r")
    run = RunDir.reopen(path)
    held, release = threading.Event(), threading.Event()

    def holder():
        with run.lock():
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    pages, lines = [], []

    def sleep(seconds):  # each tick: keep the page as it was; the third tick ends the run
        pages.append((path / "report" / "index.html").read_text())
        if len(pages) == 3:
            release.set()
            thread.join()

    out = watch_report(path, 5, log=lines.append, sleep=sleep)
    assert len(pages) == 3 and all('content="5"' in p for p in pages)
    final = (out / "index.html").read_text()
    assert 'http-equiv="refresh"' not in final and "finished" in final
    assert lines[0].startswith("running") and lines[-1].startswith("finished")


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["fg", "bg"])
def test_report_watch_ctrl_c_exits_130(runs, tmp_path, inherited):
    """Ctrl-C stops the watch, also in a background job (which inherits SIGINT ignored)."""
    path = _copy(runs, "cut", tmp_path / "r")
    with RunDir.reopen(path).lock():
        proc = subprocess.Popen(
            [sys.executable, "-m", "evomerge.search.cli.main", "report", "--watch", str(path)]
            + ["--every", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, inherited),
        )
        page = path / "report" / "index.html"
        deadline = time.time() + 120
        while time.time() < deadline and not page.exists():
            time.sleep(0.1)
        assert page.exists()
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, out
    assert 'content="1"' in page.read_text()


def test_report_watch_of_a_not_run_is_one_line_exit_2(tmp_path):
    res = _cli("report", "--watch", str(tmp_path))
    lines = (res.stdout + res.stderr).strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "not a run directory" in lines[0]
    res = _cli("report", "--watch", str(tmp_path), "--every", "0")
    assert res.returncode == 2 and "--every" in res.stdout + res.stderr


def test_resume_of_a_finished_run_shows_its_state(runs, tmp_path):
    """Resuming a finished run runs nothing and shows the journal's state: every evaluation
    done and the best fitness, not `gen 0 ... best nan`."""
    path = _copy(runs, "done", tmp_path / "r")
    res = _cli("resume", str(path), env={**os.environ, "COLUMNS": "160"})
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    best = RunDir.reopen(path).ranked()[0]
    assert "8/8" in out and "gen 2" in out, out
    assert f"best {best['fitness']:.4f}" in out and "nan" not in out, out


# -- the report as a person sees it ---------------------------------------------------------


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",  # fresh: nothing of a previous run
        "--hide-scrollbars",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.browser
def test_report_renders_with_its_plots_in_chromium(runs, tmp_path):
    from matplotlib.image import imread

    assert os.access(CHROMIUM, os.X_OK), (
        f"{CHROMIUM} is missing: `make browser` (or apt-get install chromium) installs it"
    )
    report = write_report(_copy(runs, "done", tmp_path / "r"))
    names = re.findall(r'<img src="([^"]+)"', (report / "index.html").read_text())
    assert names[:2] == ["fitness.png", "genome.png"]

    # every image loaded, at the size of its file
    probe = report / "probe.html"
    script = (
        "<script>window.addEventListener('load', () => { for (const i of document.images) "
        "i.setAttribute('data-loaded', i.complete + ':' + i.naturalWidth + 'x' + "
        "i.naturalHeight); });</script>"
    )
    probe.write_text((report / "index.html").read_text().replace("</body>", script + "</body>"))
    dom = _chromium(
        ["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path / "p1"
    ).stdout
    for name in names:
        h, w = imread(report / name).shape[:2]
        assert re.search(rf'src="{name}"[^>]*data-loaded="true:{w}x{h}"', dom), (name, dom[-800:])

    # the screenshot against the same page with the images hidden: the plots are what differ,
    # a plot-sized region with matplotlib's colours in it
    size = (1100, 3000)
    shot, blank = tmp_path / "shot.png", tmp_path / "blank.png"
    hidden = report / "hidden.html"
    hidden.write_text(
        (report / "index.html")
        .read_text()
        .replace("<body>", "<body><style>img{visibility:hidden}</style>")
    )
    for page, png, profile in ((report / "index.html", shot, "p2"), (hidden, blank, "p3")):
        res = _chromium(
            [f"--window-size={size[0]},{size[1]}", f"--screenshot={png}", page.as_uri()],
            tmp_path / profile,
        )
        assert png.is_file(), res.stderr[-2000:]
    if os.environ.get("EVOMERGE_SCREENSHOT"):  # to look at it: EVOMERGE_SCREENSHOT=FILE
        shutil.copy(shot, os.environ["EVOMERGE_SCREENSHOT"])
    a, b = imread(shot)[..., :3], imread(blank)[..., :3]
    assert a.shape == b.shape == (size[1], size[0], 3)
    assert b.std() > 0.01  # the text and tables rendered in both
    differ = (abs(a - b).sum(axis=2) > 0.05).nonzero()
    height = differ[0].max() - differ[0].min()
    width = differ[1].max() - differ[1].min()
    fitness_h, fitness_w = imread(report / "fitness.png").shape[:2]
    assert width >= fitness_w * 0.9 and height >= fitness_h, (width, height)
    # colour is only in the plots (text and tables are grey): curves, the genome's heatmaps
    colourful = lambda img: ((img.max(axis=2) - img.min(axis=2)) > 0.3).sum()  # noqa: E731
    assert colourful(b) == 0 and colourful(a) > 5000, (colourful(a), colourful(b))
