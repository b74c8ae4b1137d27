"""A regular (non-editable) install: one import package, `evomerge`, whose CLI works from outside
the checkout, with the shipped configs and task YAMLs inside it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_only_evomerge_and_the_cli_runs_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("evomerge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {
        "evomerge",
        wheel.name.split("-py")[0] + ".dist-info",
    }
    assert "evomerge/configs/demo.yaml" in names
    assert "evomerge/configs/tasks/zoo_add_gen_search.yaml" in names
    assert not any(n.startswith(("tests/", "experiments/")) for n in names)

    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [
            sys.executable,
            "-c",
            "import evomerge.merge, evomerge.search.cli.demo as d; "
            "print(evomerge.merge.__file__); print(d.DEMO_CONFIG)",
        ],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(p.startswith(str(target)) for p in where), where  # not the checkout
    run = subprocess.run(
        [sys.executable, "-m", "evomerge.search.cli.main", "search", where[1], "--help"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and "Start a search" in run.stdout, run.stderr
