"""experiments/bench_scale.py --quick runs end to end: every row measured, every figure finite and
positive (the values themselves are the benchmark's to report, not this test's), the start-up
rows from the code each was meant to measure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_scale_quick(tmp_path):
    out = tmp_path / "scale.json"
    # the family in tmp_path: never the cache another run in the same tree may be writing
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_scale.py"), "--quick"]
    cmd += ["--models", str(tmp_path / "models"), "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["parameters"] > 0
    cpu = {(r["method"], r["code"]) for r in report["rows"] if r["device"] == "cpu"}
    assert cpu == {(m, c) for m in ("ties", "linear") for c in ("before", "after")}
    for row in report["rows"]:
        # on a GPU machine the CUDA rows' figures are the device's (the host holds ~nothing)
        if row["device"] == "cpu":
            figures = {k: row[k] for k in ("steady_load", "steady_merge", "peak")}
            figures.update({k: row[k] for k in ("steady_load_x", "steady_merge_x", "peak_x")})
        else:
            figures = dict(row["device_bytes"])
        figures.update(load_s=row["load_s"], merge_s=row["merge_s"])
        for key, value in figures.items():
            assert math.isfinite(value) and value > 0, (row["method"], row["code"], key, value)
        assert row["peak"] >= row["steady_merge"]
        # each child imported the code it was meant to: the old tree's files, or the working tree's
        for f in row["files"].values():
            inside = Path(f).is_relative_to(ROOT)
            assert inside == (row["code"] == "after"), (row["code"], f)
    assert {g["method"] for g in report["goals"]} == {"ties", "linear"}
    assert "goal after" in run.stdout
    # start-up: the old code (no load_stats) and the working tree on one thread and on two, warm
    # and cold, every row loading the same bytes
    startup = report["startup"]["rows"]
    cases = {(r["code"], r["threads"], r["cache"]) for r in startup if r["device"] == "cpu"}
    assert cases == {
        (c, n, k) for c, n in (("before", 1), ("after", 1), ("after", 2)) for k in ("warm", "cold")
    }
    assert len({r["bytes"] for r in startup}) == 1
    for row in startup:
        assert row["gb_per_s"] > 0 and row["model_s"] > 0 and row["model_params"] > 0, row
        if row["code"] == "before":
            assert row["load_stats"] is None
        else:
            assert row["load_stats"]["bytes"] == row["bytes"]
            assert row["load_stats"]["threads"] == row["threads"]
            assert row["load_stats"]["seconds"] <= row["load_s"]
    assert "worker start-up" in run.stdout
    # the journal's figures: each code's status and report timed, the compact journal smaller
    journal = {r["code"]: r for r in report["journal"]["rows"]}
    assert {"before", "after", "after, journal written before"} <= set(journal)
    for row in journal.values():
        assert all(row[k] > 0 for k in ("journal_mb", "status_s", "report_s")), row
    assert journal["after"]["journal_mb"] < journal["before"]["journal_mb"] / 2
