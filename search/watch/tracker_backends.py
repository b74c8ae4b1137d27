"""Tracker backends: TensorBoard, MLflow and Weights & Biases behind one protocol.

Each backend's package is an optional extra, imported in `open` only when chosen. The
fan-out that calls them (a background thread, the ledger that makes resumes log nothing twice)
is `search/watch/trackers.py`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import yaml

from evomerge.search.run.rundir import RunDir
from evomerge.search.trial import TrialRecord


class Tracker(Protocol):
    """One backend. `open` starts or continues its run and returns what identifies it (kept in
    trackers.json and handed back as `saved` on resume); every other call logs."""

    name: str

    def open(self, run: RunDir, saved: dict) -> dict: ...

    def where(self) -> str: ...

    def logged_steps(self) -> set[int]: ...

    def config(self, config: dict) -> None: ...

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def best(self, step: int, trial: TrialRecord, files: dict[str, Path]) -> None: ...

    def table(self, name: str, rows: list[dict], markdown: str) -> None: ...

    def close(self, status: str) -> None: ...


def _flat(data: object, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys (MLflow params are flat strings)."""
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for key, value in data.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): json.dumps(data) if not isinstance(data, str) else data}


class TensorBoardTracker:
    """Event files under RUN_DIR/tensorboard (`tensorboard --logdir runs` shows every search)."""

    name = "tensorboard"

    def open(self, run: RunDir, saved: dict) -> dict:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.logdir = run.path / "tensorboard"
        # a new session writes a new event file; events of an earlier session past what the
        # ledger recorded (a kill between a write and its ledger entry) are purged from view
        last = saved.get("last_step")
        self.writer = SummaryWriter(
            str(self.logdir), purge_step=None if last is None else last + 1, flush_secs=30
        )
        return {"logdir": str(self.logdir)}

    def where(self) -> str:
        return f"tensorboard --logdir {self.logdir}"

    def logged_steps(self) -> set[int]:
        return set()  # the ledger and purge_step keep TensorBoard exact

    def config(self, config: dict) -> None:
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "```\n" + text + "```", 0)
        self.writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # before the ledger says it is logged

    def best(self, step: int, trial: TrialRecord, files: dict[str, Path]) -> None:
        recipe = files["recipe.yaml"].read_text()
        self.writer.add_text("best/recipe", "```\n" + recipe + "```", step)
        self.writer.flush()

    def table(self, name: str, rows: list[dict], markdown: str) -> None:
        self.writer.add_text(name, markdown, 0)  # TensorBoard renders markdown tables
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class MLflowTracker:
    """A run in MLFLOW_TRACKING_URI, else in a file store `mlruns/` in the working directory
    (the MLflow convention: `mlflow ui` run there shows every search); the experiment is
    MLFLOW_EXPERIMENT_NAME, else `evomerge`."""

    name = "mlflow"

    def open(self, run: RunDir, saved: dict) -> dict:
        from urllib.parse import urlparse

        # bounded retries: a dead server costs seconds once, not minutes per call (MLflow
        # retries 7 times with exponential backoff by default)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self.Metric, self.Param = Metric, Param
        env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        # a resumed search goes on in the store it started in, unless told otherwise
        uri = env_uri or saved.get("tracking_uri") or Path("mlruns").resolve().as_uri()
        if urlparse(uri).scheme in ("", "file"):
            # MLflow 3 refuses a file store unless this is set; a local mlruns/ is the point
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        run_id = saved.get("run_id") if saved.get("tracking_uri") == uri else None
        if run_id is not None:
            self.client.get_run(run_id)  # raises if it is gone: one warning, no logging
            self.client.update_run(run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "evomerge")
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            tags = {"evomerge.run_dir": str(run.path.resolve())}
            run_id = self.client.create_run(
                experiment, run_name=run.config.name, tags=tags
            ).info.run_id
        self.run_id = run_id
        return {"tracking_uri": uri, "run_id": run_id}

    def where(self) -> str:
        return f"mlflow run {self.run_id} in {self.uri}"

    def logged_steps(self) -> set[int]:
        history = self.client.get_metric_history(self.run_id, "trial/fitness")
        return {m.step for m in history}

    def config(self, config: dict) -> None:
        # MLflow params: flat strings of at most 6000 characters, at most 100 per call
        params = [self.Param(k, v[:6000]) for k, v in _flat(config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "run.yaml")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        metrics = [self.Metric(k, v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def best(self, step: int, trial: TrialRecord, files: dict[str, Path]) -> None:
        for path in files.values():
            self.client.log_artifact(self.run_id, str(path), "best")
        self.client.set_tag(self.run_id, "best_trial", f"{trial.generation}:{trial.index}")

    def table(self, name: str, rows: list[dict], markdown: str) -> None:
        self.client.log_text(self.run_id, markdown + "\n", f"{name}.md")
        self.client.log_text(self.run_id, json.dumps(rows, indent=1), f"{name}.json")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class WandbTracker:
    """A W&B run in WANDB_PROJECT (else `evomerge`), its local files under RUN_DIR/wandb.
    WANDB_MODE=offline logs without a network (`wandb sync RUN_DIR/wandb/offline-run-*`)."""

    name = "wandb"

    def open(self, run: RunDir, saved: dict) -> dict:
        import wandb

        mode = os.environ.get("WANDB_MODE", "online")
        if mode == "online" and not _wandb_credentials():
            # never let wandb ask for a key: the search is often on a node nobody watches
            raise RuntimeError(
                "not logged in; run `wandb login`, set WANDB_API_KEY, or WANDB_MODE=offline"
            )
        self.wandb = wandb
        run_id = saved.get("run_id") or uuid.uuid4().hex[:12]  # W&B ids: [a-z0-9]
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "evomerge"),
            name=run.config.name,
            id=run_id,
            resume="allow",  # the same run id continues the same W&B run
            dir=str(run.path),
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )
        # every series against evaluations, the x-axis of every tracker
        self.run.define_metric("evaluations")
        self.run.define_metric("*", step_metric="evaluations")
        return {"run_id": run_id, "project": self.run.project}

    def where(self) -> str:
        url = getattr(self.run, "url", None)
        return f"wandb run {self.run.id}" + (f": {url}" if url else f" (offline, {self.run.dir})")

    def logged_steps(self) -> set[int]:
        return set()

    def config(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**values, "evaluations": step})

    def best(self, step: int, trial: TrialRecord, files: dict[str, Path]) -> None:
        artifact = self.wandb.Artifact(f"{self.run.id}-best-recipe", type="recipe")
        for name, path in files.items():
            artifact.add_file(str(path), name=name)
        self.run.log_artifact(artifact)
        self.run.summary["best_trial"] = f"{trial.generation}:{trial.index}"

    def table(self, name: str, rows: list[dict], markdown: str) -> None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        data = [[r.get(c) for c in columns] for r in rows]
        self.run.log({name: self.wandb.Table(columns=columns, data=data)})

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = base.split("://", 1)[-1].split("/", 1)[0]
    return host in hosts


BACKENDS: dict[str, Callable[[], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MLflowTracker,
    "wandb": WandbTracker,
}
