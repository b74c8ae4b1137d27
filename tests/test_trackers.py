"""Trackers, offline and read back with each tracker's own reader: TensorBoard's event
accumulator, the MLflow client on a file store, W&B's offline run files. The curves must equal
the journal; a killed and resumed search must be one tracker run with each trial once; a failing
tracker must be one warning, never the end of the search."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.merge.errors import EvomergeError
from evomerge.search.config import SearchConfig
from evomerge.search.loop.driver import run_search
from evomerge.search.loop.workers import SerialExecutor
from evomerge.search.run.rundir import RunDir
from evomerge.search.watch.trackers import LEDGER, OLD_LEDGER, Reporter, read_ledger, write_ledger
from tests.conftest import Stop, search_config, stopping_after


@pytest.fixture(autouse=True)
def _offline_trackers(tmp_path, monkeypatch):
    """Every tracker offline and inside the test's directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # MLflow's default store: ./mlruns


def _cfg(zoo, **kw):
    # 8 items per task, 3 generations of 4: the journal has 12 trials
    return search_config(zoo, report_to=["tensorboard", "mlflow", "wandb"], **kw)


def _search(path, cfg, stop_after=None, names=None, backends=None):
    run = RunDir.reopen(path, cfg) if (path / "run.yaml").exists() else RunDir.create(path, cfg)
    warnings: list[str] = []
    reporter = Reporter(run, names or cfg.report_to, warn=warnings.append, backends=backends)
    try:
        run_search(run, lambda: SerialExecutor(cfg), reporter.hooks(stopping_after(stop_after)))
    finally:
        reporter.close("FINISHED")
    return run, warnings


def _journal_curve(run: RunDir) -> dict[int, float]:
    """evaluations -> fitness, in the journal's order of finished trials."""
    order, seen = [], set()
    for r in run.records():
        key = (r["generation"], r["index"])
        if r.get("status") in ("COMPLETE", "FAILED") and key not in seen:
            seen.add(key)
            order.append(r["fitness"])
    return {step: f for step, f in enumerate(order, start=1)}


def _tensorboard(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _mlflow(tmp_path: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())


def _wandb_records(path: Path) -> list:
    """The records of a W&B run file (`run-ID.wandb`): a 7-byte header, then LevelDB-log
    chunks (crc32c 4, length 2, type 1, data) in 32 KiB blocks, each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # full, or last of a split record
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(run_dir: Path) -> tuple[set[str], list[dict]]:
    """(run ids, history rows) of every offline W&B session of a run directory."""
    ids, rows = set(), []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for r in _wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.add(r.run.run_id)
            elif kind == "history":
                rows.append(
                    {
                        (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                        for i in r.history.item
                    }
                )
    return ids, rows


# -- config and command line ----------------------------------------------------------------


def test_report_to_follows_the_trainer_convention(tiny_zoo):
    assert search_config(tiny_zoo).report_to == []
    assert search_config(tiny_zoo, report_to="none").report_to == []
    assert search_config(tiny_zoo, report_to="mlflow").report_to == ["mlflow"]
    both = search_config(tiny_zoo, report_to="tensorboard, MLflow,tensorboard")
    assert both.report_to == ["tensorboard", "mlflow"]
    assert search_config(tiny_zoo, report_to=["wandb", "none"]).report_to == ["wandb"]
    with pytest.raises(EvomergeError, match="'neptune' is not a tracker; choose from none, tens"):
        search_config(tiny_zoo, report_to=["mlflow", "neptune"])
    # where a search is watched is not what it decides: a resume may change it
    a, b = search_config(tiny_zoo), search_config(tiny_zoo, report_to=["wandb"])
    assert a.digest() == b.digest()


@pytest.mark.parametrize("command", ["search", "resume"])
def test_report_to_wrong_name_is_one_line_exit_2(tiny_zoo, tmp_path, command):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(search_config(tiny_zoo).dump()))
    RunDir.create(tmp_path / "r", search_config(tiny_zoo))
    target = str(config) if command == "search" else str(tmp_path / "r")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "evomerge.search.cli.main",
            command,
            target,
            "--report-to",
            "neptune",
        ],
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert res.returncode == 2, lines
    assert len(lines) == 1 and "neptune" in lines[0], lines
    assert "none, tensorboard, mlflow, wandb" in lines[0]
    assert not (tmp_path / "runs").exists()


# -- the curves are the journal's -----------------------------------------------------------


def test_tracker_curves_equal_the_journal(tiny_zoo, tmp_path):
    cfg = _cfg(tiny_zoo)
    run, warnings = _search(tmp_path / "r", cfg)
    assert warnings == []
    curve = _journal_curve(run)
    assert sorted(curve) == list(range(1, 13))

    # TensorBoard, read by its own reader
    tb = tmp_path / "r" / "tensorboard"
    assert dict(_tensorboard(tb, "trial/fitness")) == pytest.approx(curve, abs=1e-6)
    trials = run.trials()
    by_gen = {}
    for (g, _), t in trials.items():
        by_gen.setdefault(g, []).append(t["fitness"])
    means = [v for _, v in _tensorboard(tb, "generation/mean")]
    assert means == pytest.approx([sum(f) / len(f) for _, f in sorted(by_gen.items())], abs=1e-6)
    assert [s for s, _ in _tensorboard(tb, "generation/mean")] == [4, 8, 12]
    metric = next(iter(trials[1, 0]["metrics"]))
    tb_metric = dict(_tensorboard(tb, f"metrics/{metric}"))
    assert tb_metric[1] == pytest.approx(trials[1, 0]["metrics"][metric], abs=1e-6)

    # MLflow, read by its client from the default local store ./mlruns
    client = _mlflow(tmp_path)
    experiment = client.get_experiment_by_name("evomerge")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    history = client.get_metric_history(run_id, "trial/fitness")
    assert {m.step: m.value for m in history} == pytest.approx(curve)
    assert len(history) == 12
    spread = client.get_metric_history(run_id, "generation/spread")
    assert [m.step for m in spread] == [4, 8, 12]
    assert runs[0].data.params["cma.popsize"] == "4"
    assert runs[0].data.params["fitness.limit"] == "8"
    best = client.download_artifacts(run_id, "best/recipe.yaml", str(tmp_path / "dl"))
    assert Path(best).read_text() == (tmp_path / "r" / "best" / "recipe.yaml").read_text()
    ledger = read_ledger(tmp_path / "r")
    assert ledger["mlflow"]["run_id"] == run_id

    # W&B offline: the run file holds every trial once, against evaluations
    ids, rows = _wandb_history(tmp_path / "r")
    assert ids == {ledger["wandb"]["run_id"]}
    logged = {r["evaluations"]: r["trial/fitness"] for r in rows if "trial/fitness" in r}
    assert logged == pytest.approx(curve)
    assert sum("trial/fitness" in r for r in rows) == 12


# -- a killed and resumed search is one tracker run -----------------------------------------


def _quick(zoo):  # without the final rescoring (5 candidates on every item) where not needed
    return {**search_config(zoo).fitness.model_dump(), "rescore": {"top": 0}}


@pytest.mark.parametrize("ledger", ["jsonl", "old json"])
def test_killed_and_resumed_search_is_one_tracker_run(tiny_zoo, tmp_path, ledger):
    """Also from the ledger of a run started before the append-only one (trackers.json, one
    JSON object): read, continued, and replaced by trackers.jsonl."""
    cfg = _cfg(tiny_zoo, fitness=_quick(tiny_zoo))
    path = tmp_path / "r"
    with pytest.raises(Stop):
        _search(path, cfg, stop_after=6)  # killed in the middle of generation 2
    # appended to, line by line (the session's opening compaction, then one line per call)
    assert len((path / LEDGER).read_bytes().splitlines()) > 3 * 6
    first = read_ledger(path)
    assert len(first["mlflow"]["logged"]["trials"]) == 6
    # the worst moment for a kill: after the trackers wrote trial 6, before the ledger did
    for name in ("tensorboard", "mlflow"):
        first[name]["logged"]["trials"].remove("2:1")
        first[name]["last_step"] = 5
    if ledger == "jsonl":
        write_ledger(path, first)
    else:
        (path / LEDGER).unlink()
        (path / OLD_LEDGER).write_text(json.dumps(first, indent=1) + "\n")
    run, warnings = _search(path, cfg)
    assert warnings == []
    assert not (path / OLD_LEDGER).exists()  # replaced by the append-only ledger
    curve = _journal_curve(run)
    assert len(curve) == 12
    after = read_ledger(path)
    assert after["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    assert after["wandb"]["run_id"] == first["wandb"]["run_id"]

    # MLflow: one run, each evaluation once, equal to the journal
    client = _mlflow(tmp_path)
    experiment = client.get_experiment_by_name("evomerge")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first["mlflow"]["run_id"]]
    history = client.get_metric_history(runs[0].info.run_id, "trial/fitness")
    assert sorted(m.step for m in history) == list(range(1, 13))  # none twice
    assert {m.step: m.value for m in history} == pytest.approx(curve)
    gens = client.get_metric_history(runs[0].info.run_id, "generation/mean")
    assert sorted(m.step for m in gens) == [4, 8, 12]

    # TensorBoard: two sessions' event files, one curve, each step once
    tb = _tensorboard(path / "tensorboard", "trial/fitness")
    assert len(list((path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert [s for s, _ in tb] == list(range(1, 13))
    assert dict(tb) == pytest.approx(curve, abs=1e-6)

    # W&B: two offline sessions of one run id; together every evaluation once
    ids, rows = _wandb_history(path)
    assert ids == {first["wandb"]["run_id"]}
    assert len(list(path.glob("wandb/offline-run-*"))) == 2
    steps = sorted(r["evaluations"] for r in rows if "trial/fitness" in r)
    assert steps == list(range(1, 13))  # W&B's ledger was left whole: none logged twice


def test_report_to_added_on_resume_backfills_the_journal(tiny_zoo, tmp_path):
    """A search run without trackers, resumed with one: the tracker gets the whole search."""
    cfg = search_config(tiny_zoo, fitness=_quick(tiny_zoo))
    path = tmp_path / "r"
    with pytest.raises(Stop):
        _search(path, cfg, stop_after=6, names=[])
    assert not (path / "tensorboard").exists()
    run, warnings = _search(path, cfg, names=["tensorboard"])
    assert warnings == []
    assert dict(_tensorboard(path / "tensorboard", "trial/fitness")) == pytest.approx(
        _journal_curve(run), abs=1e-6
    )


# -- a tracker never kills a search ---------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens


class Flaky:
    """A tracker whose third scalar call raises."""

    name = "tensorboard"

    def __init__(self):
        self.calls = 0

    def open(self, run, saved):
        return {"flaky": True}

    def where(self):
        return "nowhere"

    def logged_steps(self):
        return set()

    def config(self, config):
        pass

    def scalars(self, step, values):
        self.calls += 1
        if self.calls == 3:
            raise ConnectionError("the server went away\nsecond line")

    def best(self, step, trial, files):
        raise AssertionError("dropped trackers are not called again")

    def table(self, name, rows, markdown):
        pass

    def close(self, status):
        pass


def test_failing_trackers_are_one_warning_each_and_the_search_goes_on(
    tiny_zoo, tmp_path, monkeypatch
):
    from evomerge.search.watch.trackers import BACKENDS

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = search_config(tiny_zoo, fitness=_quick(tiny_zoo))

    def missing():
        raise ImportError("No module named 'wandb'", name="wandb")

    class NotInstalled(Flaky):
        def open(self, run, saved):
            missing()

    backends = {**BACKENDS, "tensorboard": Flaky, "wandb": NotInstalled}
    run, warnings = _search(
        tmp_path / "r", cfg, names=["tensorboard", "mlflow", "wandb"], backends=backends
    )
    assert sum(t["status"] == "COMPLETE" for t in run.trials().values()) == 12
    assert (tmp_path / "r" / "best" / "recipe.yaml").is_file()
    assert len(warnings) == 3, warnings
    by_name = {n: w for w in warnings for n in ("mlflow", "tensorboard", "wandb") if n in w[:20]}
    assert "127.0.0.1" in by_name["mlflow"] or "Connection" in by_name["mlflow"], by_name
    assert "the search goes on" in by_name["mlflow"]
    assert "ConnectionError: the server went away" in by_name["tensorboard"]
    assert "\n" not in by_name["tensorboard"]
    assert "pip install 'evomerge[wandb]'" in by_name["wandb"], warnings


# -- the command line -----------------------------------------------------------------------


def test_search_with_report_to_tensorboard_from_the_command_line(tiny_zoo, tmp_path):
    data = search_config(
        tiny_zoo, cma={"popsize": 4, "budget": 4, "seed": 3}, fitness=_quick(tiny_zoo)
    ).dump()
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "evomerge.search.cli.main",
            "search",
            str(config),
            "--run-dir",
            str(tmp_path / "r"),
            "--report-to",
            "tensorboard",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "tensorboard --logdir" in out and "warning" not in out
    stored = yaml.safe_load((tmp_path / "r" / "run.yaml").read_text())["config"]
    assert SearchConfig.parse(stored).report_to == ["tensorboard"]  # a plain resume keeps it
    curve = _journal_curve(RunDir.reopen(tmp_path / "r"))
    assert dict(_tensorboard(tmp_path / "r" / "tensorboard", "trial/fitness")) == pytest.approx(
        curve, abs=1e-6
    )


# -- the ledger -----------------------------------------------------------------------------


def test_the_ledger_is_appended_and_read_back_as_the_entries_it_records(tmp_path):
    """Entries, then one line per call; a line cut by a kill is skipped quietly (its call is
    logged again or purged: the trackers' own state), any other unreadable line is one
    warning; a run's old trackers.json is read when there is no trackers.jsonl."""
    lines = [
        {"tracker": "mlflow", "entry": {"run_id": "r1", "logged": {"trials": ["1:0"]}}},
        {"tracker": "mlflow", "logged": "config"},
        {"tracker": "mlflow", "logged": "trials", "item": "1:1", "step": 2},
        {"tracker": "mlflow", "logged": "trials", "item": "1:1", "step": 2},  # twice: once
        {"tracker": "wandb", "logged": "trials", "item": "1:0", "step": 1},
        {"tracker": "mlflow", "logged": "best", "item": "1:1"},
    ]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in lines)
    (tmp_path / LEDGER).write_bytes(data + b'{"tracker": "mlflow", "logged": "tri')
    warnings: list[str] = []
    ledger = read_ledger(tmp_path, warnings.append)
    assert warnings == []
    assert ledger == {
        "mlflow": {
            "run_id": "r1",
            "logged": {"trials": ["1:0", "1:1"], "config": True, "best": "1:1"},
            "last_step": 2,
        },
        "wandb": {"logged": {"trials": ["1:0"]}, "last_step": 1},
    }
    (tmp_path / LEDGER).write_bytes(data[:40] + b"\n" + data + b"[1]\n")
    assert read_ledger(tmp_path, warnings.append) == ledger
    assert len(warnings) == 1 and "skipped 2 unreadable line(s)" in warnings[0]

    write_ledger(tmp_path, ledger)  # compacted: one line per tracker
    assert len((tmp_path / LEDGER).read_bytes().splitlines()) == 2
    assert read_ledger(tmp_path) == ledger

    (tmp_path / LEDGER).unlink()
    (tmp_path / OLD_LEDGER).write_text(json.dumps(ledger))
    assert read_ledger(tmp_path) == ledger
    write_ledger(tmp_path, ledger)
    assert not (tmp_path / OLD_LEDGER).exists() and read_ledger(tmp_path) == ledger
