"""A worker that cannot start: its own start-up raising (CUDA out of memory loading the sources)
stops the search at once, in one line, and leaves a resumable run; one killed while starting or
after it was ready is replaced. Workers over several GPUs: on a Ray that declares GPUs it does
not have (`num_gpus`), which is all Ray's scheduling looks at."""

from __future__ import annotations

import re
import time

import pytest
import yaml
from typer.testing import CliRunner

from evomerge.merge.errors import EvomergeError
from evomerge.search.config import WorkerConfig
from evomerge.search.loop.driver import Progress, run_search
from evomerge.search.loop.workers import RayExecutor, SerialExecutor, worker_count
from evomerge.search.run.rundir import RunDir
from tests.conftest import search_config

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"


@pytest.fixture
def fake_gpus():
    """A local Ray whose node declares `n` GPUs: actors asking for them are scheduled, and Ray
    sets CUDA_VISIBLE_DEVICES in each to the ids it gave; nothing touches a real GPU."""
    import ray

    def start(n: int, cpus: int = 2) -> None:
        ray.init(
            address="local",
            num_cpus=cpus,
            num_gpus=n,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            object_store_memory=256 * 1024 * 1024,
        )

    yield start
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_cleanup():
    """The executor shuts down the Ray it started; this only cleans up after a failed test."""
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


def _attempts(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _one_line(message: str) -> None:
    assert "\n" not in message and "Traceback" not in message and "ray::" not in message


@pytest.mark.ray
@pytest.mark.slow
def test_cli_search_whose_workers_run_out_of_memory_stops_in_one_line(
    tiny_zoo, tmp_path, monkeypatch, fake_gpus
):
    """Both GPU workers raise CUDA out of memory where the sources load: `evomerge search`
    prints one line (the OOM text, the memory hint) and exits 2 without reloading anything;
    the run resumes once the config is fixed."""
    from evomerge.search.cli.main import app
    from evomerge.search.loop import workers

    fake_gpus(2)
    attempts = tmp_path / "attempts"
    faults = {"start": "oom", "attempts": str(attempts)}
    made: list[RayExecutor] = []

    def make(config):  # the CLI's executor, with the faults (the CLI takes none)
        made.append(RayExecutor(config, faults))
        return made[-1]

    monkeypatch.setattr(workers, "make_executor", make)
    config = tmp_path / "c.yaml"
    cfg = search_config(tiny_zoo, workers={"count": None, "cpus_per_worker": 1})
    config.write_text(yaml.safe_dump(cfg.dump()))
    run_dir = tmp_path / "r"
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["search", str(config), "--run-dir", str(run_dir)])
    seconds = time.perf_counter() - start
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and isinstance(result.exception, SystemExit), out
    lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: worker "), out
    text = " ".join(out.split())
    assert "(cuda, 1 GPU, node " in text and f"could not start: {OOM}" in text, out
    assert "see `evomerge search CONFIG --check` for the memory plan" in text, out
    assert re.search(r"\(the memory plan puts \d+\.\d GB on cuda:0\)", text), out
    assert "workers.sources: host or workers.gpus_per_worker may fit it" in text, out
    assert "ray::" not in text and "creation task" not in text, out
    # one attempt per worker at most, none replaced: the first failure stopped the search
    assert made[0].workers == 2 and made[0].replacements == 0
    tried = _attempts(attempts)
    assert 1 <= len(tried) <= 2 and all(re.search(r"VISIBLE_DEVICES=\d$", t) for t in tried)
    assert seconds < 120, seconds

    # the run directory is as the search left it: no trial journaled, the lock released
    assert RunDir.reopen(run_dir).records() == []
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["resume", str(run_dir), "--workers", "0"])
    assert result.exit_code == 0, result.output
    trials = RunDir.reopen(run_dir).trials()
    assert len(trials) == 12 and all(t["status"] == "COMPLETE" for t in trials.values())


@pytest.mark.ray
@pytest.mark.slow
def test_a_replacement_that_raises_mid_search_stops_it_and_the_run_resumes(
    tiny_zoo, tmp_path, ray_cleanup
):
    """One worker: killed while loading (replaced), killed running trial 1:1 after it was
    ready (replaced), and its third start-up raises: the search stops in one line naming the
    exception (from the worker's traceback in Ray's text, not Ray's first line). The journal
    keeps what finished, and a resume runs only the rest."""
    attempts = tmp_path / "attempts"
    faults = {"attempts": str(attempts), "start:1": "die", "1:1": "die", "start:3": "raise"}
    cfg = search_config(tiny_zoo, workers={"count": 1, "cpus_per_worker": 1})
    run = RunDir.create(tmp_path / "r", cfg)
    made: list[RayExecutor] = []

    def make():
        made.append(RayExecutor(cfg, faults))
        return made[-1]

    with pytest.raises(EvomergeError) as e:
        run_search(run, make, Progress())
    message = str(e.value)
    _one_line(message)
    assert message.startswith("worker 1 of 1 (cpu, node "), message
    assert "could not start: ValueError: injected start-up fault;" in message, message
    assert "its second line" not in message and "--debug" in message, message
    assert made[0].replacements == 2 and len(_attempts(attempts)) == 3
    import ray

    assert not ray.is_initialized()  # the driver shut its executor down

    records = RunDir.reopen(run.path).records()
    done = [(r["generation"], r["index"]) for r in records if r.get("status") == "COMPLETE"]
    asked = [(r["generation"], r["index"]) for r in records if r.get("status") == "ASKED"]
    assert done == [(1, 0)] and asked == [(1, i) for i in range(4)]
    first = next(r for r in records if r.get("status") == "COMPLETE")
    assert set(RunDir.reopen(run.path).parents()) == {"base", "add", "caps"}  # scored first

    resumed = RunDir.reopen(run.path)
    run_search(resumed, lambda: SerialExecutor(resumed.config), Progress())
    after = RunDir.reopen(run.path).records()
    completes = [(r["generation"], r["index"]) for r in after if r.get("status") == "COMPLETE"]
    assert len(completes) == len(set(completes)) == 12  # 1:0 not run again
    assert next(r for r in after if r.get("status") == "COMPLETE") == first


@pytest.mark.ray
def test_gpus_per_worker_sets_the_count_and_each_workers_gpus(tiny_zoo, tmp_path, fake_gpus):
    """5 GPUs, 2 per worker: 2 workers, each given 2 GPUs of its own by Ray (one left over)."""
    import ray

    fake_gpus(5)
    attempts = tmp_path / "attempts"
    cfg = search_config(tiny_zoo, workers={"count": None, "gpus_per_worker": 2})
    executor = RayExecutor(cfg, {"start": "hang", "attempts": str(attempts)})
    try:
        assert executor.workers == 2 and executor.use_gpu
        deadline = time.monotonic() + 120
        while len(_attempts(attempts)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        seen = [ln.rsplit("CUDA_VISIBLE_DEVICES=", 1)[1].split(",") for ln in _attempts(attempts)]
        assert len(seen) == 2 and all(len(ids) == 2 for ids in seen), seen
        assert len({i for ids in seen for i in ids}) == 4  # no GPU given to both
        while ray.available_resources().get("GPU", 0) != 1 and time.monotonic() < deadline:
            time.sleep(0.2)  # the resource view trails the placement a little
        assert ray.available_resources().get("GPU", 0) == 1
        assert all(":cuda" in ln for ln in _attempts(attempts))  # "cuda": all of its GPUs
    finally:
        executor.shutdown()


def test_worker_count_from_the_clusters_resources():
    def count(resources, **wc):
        return worker_count(WorkerConfig(**wc), resources)

    assert count({"CPU": 8, "GPU": 8}) == (8, True)
    assert count({"CPU": 8, "GPU": 8}, gpus_per_worker=2) == (4, True)
    assert count({"CPU": 8, "GPU": 7}, gpus_per_worker=2) == (3, True)
    assert count({"CPU": 8}, gpus_per_worker=2) == (8, False)  # auto without GPUs: CPU slots
    assert count({"CPU": 8, "GPU": 8}, device="cpu", cpus_per_worker=3) == (2, False)
    # an explicit count is placed as GPUs come (an autoscaler adds nodes for pending actors)
    assert count({"CPU": 8}, device="cuda", count=2, gpus_per_worker=4) == (2, True)
    with pytest.raises(EvomergeError) as e:
        count({"CPU": 8, "GPU": 2}, gpus_per_worker=4)
    assert str(e.value) == (
        "workers.gpus_per_worker: 4, but the Ray cluster has 2 GPUs, fewer than one worker "
        "needs; lower it to 2 or fewer"
    )
    with pytest.raises(EvomergeError, match="workers.device: cuda, but the Ray cluster has no"):
        count({"CPU": 8}, device="cuda")


@pytest.mark.ray
def test_a_cluster_without_the_gpus_a_worker_needs_is_one_line_and_ray_is_shut_down(
    tiny_zoo, ray_cleanup
):
    import ray

    cfg = search_config(tiny_zoo, workers={"count": None, "device": "cuda"})
    with pytest.raises(EvomergeError) as e:
        RayExecutor(cfg)  # this machine's Ray has no GPU
    _one_line(str(e.value))
    assert "workers.device: cuda" in str(e.value)
    assert not ray.is_initialized()  # the Ray it started for itself is not left behind


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("oom", f"the worker (cpu) could not start: {OOM}"),
        ("raise", "the worker (cpu) could not start: ValueError: injected start-up fault;"),
    ],
)
def test_a_serial_worker_that_cannot_start_is_one_line(tiny_zoo, kind, expected):
    cfg = search_config(tiny_zoo)
    with pytest.raises(EvomergeError) as e:
        SerialExecutor(cfg, {"start": kind})
    _one_line(str(e.value))
    assert str(e.value).startswith(expected), str(e.value)
    assert "its second line" not in str(e.value)
