"""Kill-and-fault soak.

    python experiments/soak.py [--kills 20] [--fault-rate 0.2] [--seed 0]

Phase 1: the same search (tiny zoo, serial worker) is run once uninterrupted, and once with its
driver SIGKILLed at random moments `--kills` times (each after a random number of new journal
records, so kills land mid-generation, between a result and a snapshot, anywhere), resumed after
each kill. Checked: no finished trial lost or duplicated, the same decisions (every vector and
score), the same best recipe.
Phase 2: a search on 2 Ray workers with faults injected into a `--fault-rate` share of trials
(exceptions, NaN scores, hangs past the timeout, killed workers). Checked: every fault recorded
as FAILED with its cause, every other trial COMPLETE, the search finished.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
from evomerge.search import env  # noqa: E402

env.apply()


def config_data(zoo: Path, budget: int) -> dict:
    return {
        "name": "soak",
        "models": {a: {"path": str(zoo / "llama" / a)} for a in ("base", "add", "caps")},
        "base": "base",
        "space": {"method": "ties", "layers_per_group": 1},
        "fitness": {
            "tasks": [{"name": "zoo_add_gen_search"}, {"name": "zoo_caps_mc_search"}],
            "include": [str(zoo / "tasks")],
            "limit": 8,
            "batch_size": 16,
        },
        "cma": {"popsize": 4, "budget": budget, "seed": 11, "sigma0": 0.3},
        "workers": {"count": 0},
    }


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "evomerge.search.cli.main", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def outcome(run_dir: Path) -> dict:
    from evomerge.search.run.rundir import RunDir

    return {
        k: (t["status"], t["fitness"], tuple(t["x"]))
        for k, t in RunDir.reopen(run_dir).trials().items()
    }


def kill_soak(zoo: Path, tmp: Path, kills: int, rng: random.Random) -> None:
    from evomerge.search.run.rundir import RunDir

    cfg = tmp / "soak.yaml"
    cfg.write_text(yaml.safe_dump(config_data(zoo, budget=4 * (kills + 10))))
    t0 = time.perf_counter()
    assert cli("search", str(cfg), "--run-dir", str(tmp / "ref")).wait() == 0
    ref_seconds = time.perf_counter() - t0
    run_dir, journal = tmp / "killed", tmp / "killed" / "trials.jsonl"
    survived, finished_seen = 0, set()
    proc = cli("search", str(cfg), "--run-dir", str(run_dir))
    while True:
        if survived >= kills:  # enough kills: let the last resume finish
            assert proc.wait() == 0, f"the search exited with {proc.returncode}"
            break
        target = lines(journal) + rng.randint(1, 6)
        while proc.poll() is None and lines(journal) < target:
            time.sleep(0.005)
        if proc.poll() is not None:  # finished (a search shorter than the kills asked ends here)
            assert proc.returncode == 0, f"the search exited with {proc.returncode}"
            break
        else:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            survived += 1
            done = {
                (r["generation"], r["index"])
                for r in RunDir.reopen(run_dir).records()
                if r.get("status") == "COMPLETE"
            }
            assert finished_seen <= done, "a finished trial was lost"
            finished_seen = done
        proc = cli("resume", str(run_dir))
    records = RunDir.reopen(run_dir).records()
    completes = [(r["generation"], r["index"]) for r in records if r.get("status") == "COMPLETE"]
    duplicated = len(completes) - len(set(completes))
    same = outcome(run_dir) == outcome(tmp / "ref")
    same_best = (run_dir / "best" / "recipe.yaml").read_text() == (
        tmp / "ref" / "best" / "recipe.yaml"
    ).read_text()
    print(
        f"kill soak: {survived} SIGKILLs survived; {len(set(completes))} trials finished "
        f"(uninterrupted run: {len(outcome(tmp / 'ref'))} in {ref_seconds:.0f} s); "
        f"finished trials lost 0, duplicated {duplicated}; same decisions: {same}; "
        f"same best: {same_best}"
    )
    assert duplicated == 0 and same and same_best


def fault_soak(zoo: Path, tmp: Path, rate: float, rng: random.Random) -> None:
    from evomerge.search.config import SearchConfig
    from evomerge.search.loop.driver import run_search
    from evomerge.search.loop.workers import RayExecutor
    from evomerge.search.run.rundir import RunDir

    data = config_data(zoo, budget=32)
    data["workers"] = {"count": 2, "cpus_per_worker": 1, "trial_timeout": 15}
    cfg = SearchConfig.parse(data)
    kinds = ["raise", "nan", "hang", "die"]
    faults = {
        f"{g}:{i}": rng.choice(kinds) for g in range(1, 9) for i in range(4) if rng.random() < rate
    }
    run = RunDir.create(tmp / "faults", cfg)
    t0 = time.perf_counter()
    run_search(run, lambda: RayExecutor(cfg, faults))
    seconds = time.perf_counter() - t0
    expect = {
        "raise": "injected fault",
        "nan": "non-finite",
        "hang": "timeout",
        "die": "died twice",
    }
    trials = run.trials()
    for key, kind in faults.items():
        g, i = (int(p) for p in key.split(":"))
        t = trials[g, i]
        assert t["status"] == "FAILED" and expect[kind] in t["error"], (key, kind, t.get("error"))
    others = [t for (g, i), t in trials.items() if f"{g}:{i}" not in faults]
    assert all(t["status"] == "COMPLETE" for t in others)
    counts = {k: list(faults.values()).count(k) for k in kinds}
    print(
        f"fault soak: {len(trials)} trials in {seconds:.0f} s; {len(faults)} faults injected "
        f"{counts}; all recorded as FAILED with their cause; {len(others)} others COMPLETE"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--fault-rate", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from evomerge.fitness.zoo.build import build_zoo

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf")
        zoo = build_zoo(tmp / "zoo", size="tiny", log=lambda *_: None)
        kill_soak(zoo, tmp, args.kills, rng)
        fault_soak(zoo, tmp, args.fault_rate, rng)


if __name__ == "__main__":
    main()
