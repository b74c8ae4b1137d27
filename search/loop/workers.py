"""Workers (sources resident, candidates in place, tasks built once) and their executors,
serial and Ray. Everything a trial can throw is a FAILED result; what a worker cannot report
(a hang, a dead process) the executors add (docs/ARCHITECTURE.md, "A trial's life").
"""

from __future__ import annotations

import gc
import math
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable

import torch

from evomerge.fitness.bounds import chunk_ends, chunk_fractions, piece
from evomerge.merge.errors import EvomergeError
from evomerge.search.config import SearchConfig, WorkerConfig
from evomerge.search.env import QUIET_ENV, passed_on
from evomerge.search.loop.racing import NOT_RACEABLE
from evomerge.search.loop.schedule import Cancelled, Died, Done, Ready, Scheduler
from evomerge.search.trial import (
    Executor,
    Feed,
    ItemScores,
    OnResult,
    Queue,
    Status,
    Trial,
    TrialResult,
)


def _ray_node() -> str:
    """The Ray node id, when running inside a Ray actor (hosts may share a hostname)."""
    try:
        import ray

        if ray.is_initialized():
            return f":node-{ray.get_runtime_context().get_node_id()[:8]}"
    except Exception:  # noqa: BLE001 - naming must never fail a worker
        pass
    return ""


def _ray_cancelled() -> bool:
    """Whether the executor cancelled the trial this Ray actor runs (False outside Ray)."""
    ray = sys.modules.get("ray")  # not imported: not in Ray (and no import per batch)
    try:
        return bool(ray and ray.is_initialized() and ray.get_runtime_context().is_canceled())
    except Exception:  # noqa: BLE001 - outside a task there is nothing to cancel
        return False


class TrialWorker:
    def __init__(
        self,
        config_data: dict,
        device: str = "cpu",
        threads: int | None = None,
        faults: dict[str, str] | None = None,
    ):
        began = time.perf_counter()
        os.environ.update(QUIET_ENV)  # the user's own HF settings arrive through the runtime env
        if threads:
            torch.set_num_threads(threads)
        from evomerge.search.spaces import space_for

        config = SearchConfig.parse(config_data)
        from evomerge.merge.io import hub

        hub.use_cache(config.cache_dir)
        hub.forbid_downloads()  # the driver resolved every model; a worker only reads the cache
        self.device = device
        if device.startswith("cuda"):  # an fp32 candidate's matmuls on tensor cores (TF32)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.name = f"{socket.gethostname()}:{os.getpid()}:{device}{_ray_node()}"
        # "generation:index" -> raise | nan | hang | die; "start" (every start-up) or "start:N"
        # (the N-th, counted in the "attempts" file) -> oom | raise | hang | die (tests, soak)
        self.faults = faults or {}
        start_fault = self._start_fault()
        if start_fault:
            _inject_start_fault(start_fault)  # where the sources load: the likeliest to fail
        self.candidate = space_for(config).candidate(device)
        fc = config.fitness
        self.scorer = config.scorer()
        if fc.backend == "vllm":  # the engine holds the candidate and answers the requests
            from evomerge.search.spaces.parameter_space import EngineCandidate

            assert isinstance(self.candidate, EngineCandidate)
            self.scorer.bind_lm(self.candidate.lm(fc.batch_size))
        else:
            self.scorer.bind(self.candidate.model, self.candidate.tokenizer, device)
        self.scorer.lm.cancelled = _ray_cancelled
        self.seed = config.cma.seed
        self.fractions = chunk_fractions(fc.racing.first_chunk, fc.racing.chunks)
        self.batch = fc.batch_size if fc.racing.whole_batches else 1  # as racing.Plan's
        self.materialized: dict | None = None  # the recipe now in the model (racing chunks)
        # The sources, the model and the built requests live as long as the worker: keep the
        # cyclic GC from rescanning them (full collections took ~0.2 s each, mid-search)
        gc.freeze()
        self.startup = startup_line(self.name, time.perf_counter() - began, self.candidate)

    def _start_fault(self) -> str | None:
        """This start-up's injected fault. With an "attempts" file, every start-up appends a line
        (its name and the GPUs Ray gave it) first, so a test counts start-ups across processes."""
        path = self.faults.get("attempts")
        if not path:
            return self.faults.get("start")
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        with open(path, "a") as f:  # one short append: whole lines even from several workers
            f.write(f"{self.name} CUDA_VISIBLE_DEVICES={gpus}\n")
        with open(path) as f:
            attempt = sum(1 for _ in f)
        return self.faults.get(f"start:{attempt}") or self.faults.get("start")

    def ping(self) -> str:
        """The start-up line (the executor logs it once the worker is ready)."""
        return self.startup

    def shardable(self) -> bool:
        return self.scorer.shardable

    def run(self, trial: Trial) -> TrialResult:
        from evomerge.merge.recipe import Recipe

        fault = self.faults.get(f"{trial.generation}:{trial.index}")
        if fault == "die":
            os._exit(17)
        if fault == "hang":
            time.sleep(10**6)
        start = time.perf_counter()
        try:
            if fault == "raise":
                raise RuntimeError("injected fault")
            if trial.recipe != self.materialized:  # a racing candidate's next chunk: in place
                self.materialized = None
                self.candidate.materialize(Recipe.parse(trial.recipe))
                self.materialized = trial.recipe
        except Exception as e:  # noqa: BLE001 - any failure of one candidate is data
            self._recover()
            return TrialResult.failed(
                f"merge: {type(e).__name__}: {e}",
                self.name,
                merge_seconds=time.perf_counter() - start,
            )
        merged = time.perf_counter()
        shard: dict[str, list[int]] | None = None
        if trial.chunk is not None:
            if not self.scorer.shardable:
                return TrialResult.failed(NOT_RACEABLE, self.name)
            shard = self._chunk(trial)
        elif trial.shard:
            shard = self.scorer.shard(*trial.shard, trial.items)
        result = self.scorer.score(shard, trial.items, per_item=trial.chunk is not None)
        fitness = math.nan if fault == "nan" else result.fitness
        items = None
        if shard is not None and trial.chunk is not None:
            totals = {name: len(docs) for name, docs in self.scorer.items(trial.items).items()}
            items = ItemScores(result.scores, shard, totals)
        common: dict = dict(
            metrics=result.metrics,
            merge_seconds=merged - start,
            eval_seconds=result.seconds,
            examples=result.examples,
            counts=result.counts,
            items=items,
        )
        if not result.ok:
            self._recover()
            return TrialResult.failed(f"eval: {result.error}", self.name, **common)
        if not math.isfinite(fitness):
            return TrialResult.failed(f"non-finite fitness {fitness}", self.name, **common)
        return TrialResult(Status.COMPLETE, fitness, worker=self.name, **common)

    def _chunk(self, trial: Trial) -> dict[str, list[int]]:
        """Chunk c of the generation's race (the same items for every candidate of it), or the
        piece of it that `trial.shard` names."""
        order = self.scorer.order(f"{self.seed}/{trial.generation}", trial.items)  # a shuffle
        c = int(trial.chunk or 0)
        out = {}
        for name, docs in order.items():
            ends = chunk_ends(len(docs), self.fractions, self.batch)
            chunk = docs[(ends[c - 1] if c else 0) : ends[c]]
            a, b = piece(len(chunk), *trial.shard) if trial.shard else (0, len(chunk))
            out[name] = chunk[a:b]
        return out

    def _recover(self) -> None:
        self.materialized = None  # a failure may have left the model (or engine) unusable
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()  # after an OOM the next candidate needs the memory back


def startup_line(name: str, seconds: float, candidate) -> str:
    """What a worker's start-up took, for the run's log: a slow one says where its time went."""
    line = f"worker {name} started in {seconds:.1f} s"
    stats = getattr(getattr(candidate, "sources", None), "load_stats", None)
    if stats is not None:
        staged = ", through pinned staging" if stats.staged else ""
        line += (
            f": sources {stats.bytes / 1e9:.2f} GB read in {stats.seconds:.1f} s "
            f"({stats.gb_per_s:.2f} GB/s, {stats.threads} threads{staged})"
        )
    return line


def _inject_start_fault(kind: str) -> None:
    if kind == "oom":  # the text torch gives when the sources do not fit a GPU
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "79.19 GiB of which 1.06 GiB is free. Of the allocated memory 76.50 GiB is "
            "allocated by PyTorch."
        )
    if kind == "raise":
        raise ValueError("injected start-up fault\nits second line")
    if kind == "hang":
        time.sleep(10**6)
    if kind == "die":
        os._exit(17)


class SerialExecutor:
    """One worker in the driver process: for tests, debugging and `--workers 0`.

    It cannot enforce trial timeouts or survive a crash of its own process.
    """

    def __init__(self, config: SearchConfig, faults: dict[str, str] | None = None):
        device = "cuda" if config.workers.device != "cpu" and torch.cuda.is_available() else "cpu"
        try:
            self.worker = TrialWorker(config.dump(), device, faults=faults)
        except EvomergeError:
            raise
        except Exception as e:  # noqa: BLE001 - as a Ray worker's: one line, traceback on --debug
            text = "".join(traceback.format_exception_only(e))
            who = f"the worker ({device})"
            raise EvomergeError(start_failure(who, text, device, config)) from e
        self.workers = 1

    def log_to(self, log: Callable[[str], None]) -> None:
        log(self.worker.startup)

    def run(self, trials: list[Trial], on_result: OnResult) -> None:
        self.stream(Queue(trials), on_result)

    def stream(self, feed: Feed, on_result: OnResult) -> None:
        """Run what `feed` hands out until it hands out nothing (racing: the next chunk may
        depend on the last result)."""
        while (trial := feed.take(0)) is not None:
            try:
                result = self.worker.run(trial)
            except Exception as e:  # noqa: BLE001
                result = TrialResult.failed(f"{type(e).__name__}: {e}", self.worker.name)
            on_result(trial, result)

    def shutdown(self) -> None:
        pass


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the task's name
_MEMORY = ("out of memory", "not enough memory", "can't allocate memory")
_TYPE = re.compile(r"^[A-Za-z_][\w.]*: ")  # "torch.OutOfMemoryError: ", "ValueError: "


def cause_line(text: str) -> str:
    """The line of an error's text that says what went wrong. A Ray error's first line only
    names the task (`...creation task, ray::TrialWorker.__init__() (pid=..., ip=...)`) or says
    that an actor died; the worker's traceback follows, and its exception's `Type: message`
    comes after the last frame. Running out of memory wins wherever it is said (an exception
    that wraps it may come last)."""
    lines = _ANSI.sub("", text).splitlines()
    # frames and their code lines are indented; what an exception says starts at the margin
    said = [ln.rstrip() for ln in lines if ln.strip() and not ln[:1].isspace()]
    memory = next((ln for ln in said if _is_memory(ln)), None)
    if memory is not None:
        return memory
    frames = [i for i, ln in enumerate(lines) if ln.lstrip().startswith('File "')]
    after = lines[frames[-1] + 1 :] if frames else lines
    found = next((ln.rstrip() for ln in after if ln.strip() and not ln[:1].isspace()), None)
    return found or next((ln.strip() for ln in lines if ln.strip()), "no message")


def _is_memory(line: str) -> bool:
    return any(m in line.lower() for m in _MEMORY)


def start_failure(who: str, text: str, device: str, config: SearchConfig | None = None) -> str:
    """The one line saying why a worker could not start (`text`: the error's text), and what
    to change; for memory, beside the memory plan's figure for the busiest GPU."""
    line = cause_line(text)
    if not _is_memory(line):
        return f"{who} could not start: {line}; `evomerge --debug` shows the worker's traceback"
    line = _TYPE.sub("", line, count=1).rstrip(".")  # "CUDA out of memory..." names itself
    if device == "cuda":
        fix = "workers.sources: host or workers.gpus_per_worker may fit it"
    else:  # CPU workers on one machine share its memory
        fix = "fewer workers per machine (workers.count) may fit it"
    return (
        f"{who} could not start: {line}{_planned(config) if device == 'cuda' else ''}; see "
        f"`evomerge search CONFIG --check` for the memory plan; {fix}"
    )


def _planned(config: SearchConfig | None) -> str:
    """ ", the memory plan puts N GB on cuda:K" (headers only), or nothing where it cannot say."""
    if config is None:
        return ""
    try:
        from evomerge.search.memory import plan_memory

        wc = config.workers  # the worker that failed ran on a GPU, whatever the driver sees
        gpu = config.model_copy(update={"workers": wc.model_copy(update={"device": "cuda"})})
        totals = plan_memory(gpu).gpu_totals()
    except Exception:  # noqa: BLE001 - the error being reported matters more than this figure
        return ""
    if not totals:
        return ""
    where, most = max(totals.items(), key=lambda kv: kv[1])
    return f" (the memory plan puts {most / 1e9:.1f} GB on {where})"


def worker_count(wc: WorkerConfig, resources: dict) -> tuple[int, bool]:
    """How many Ray workers, and whether they run on GPUs, for a cluster's resources: one per
    `gpus_per_worker` GPUs, else one per `cpus_per_worker` CPUs, unless workers.count says."""
    gpus = int(resources.get("GPU", 0))
    use_gpu = wc.device == "cuda" or (wc.device == "auto" and gpus > 0)
    if not use_gpu:
        return wc.count or max(1, int(resources.get("CPU", 1)) // wc.cpus_per_worker), False
    if wc.count:  # placed as GPUs free up or join: an autoscaler adds nodes for pending actors
        return wc.count, True
    if gpus == 0:
        raise EvomergeError(
            "workers.device: cuda, but the Ray cluster has no GPU; use auto or cpu, or set "
            "workers.count to wait for GPU nodes"
        )
    if gpus < wc.gpus_per_worker:
        raise EvomergeError(
            f"workers.gpus_per_worker: {wc.gpus_per_worker}, but the Ray cluster has {gpus} "
            f"GPU{'s' * (gpus > 1)}, fewer than one worker needs; lower it to {gpus} or fewer"
        )
    return gpus // wc.gpus_per_worker, True


class RayExecutor(Scheduler):
    """One Ray actor per `workers.gpus_per_worker` GPUs (or per CPU slot): the Scheduler's
    mechanics on Ray (launch a trial on an actor, cancel it, wait for results and start-ups,
    replace an actor that died); a worker whose start-up raises stops the search."""

    def __init__(self, config: SearchConfig, faults: dict[str, str] | None = None):
        import ray

        super().__init__(combine=lambda parts: combine_trial(config, parts))
        self.ray = ray
        self.config = config
        wc = config.workers
        self.trial_timeout = wc.trial_timeout
        self.shards = config.fitness.shards
        self.started_ray = not ray.is_initialized()
        if self.started_ray:
            env = passed_on()
            kwargs: dict = dict(
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": env},
                logging_level="ERROR",
            )
            # Without an address, Ray would attach to the last cluster `ray start` (or another
            # search, or a test) left on this machine: start our own instead, unless the user
            # names one (workers.address, --address, or Ray's own RAY_ADDRESS).
            address = wc.address or os.environ.get("RAY_ADDRESS")
            if address:
                kwargs["address"] = address
            else:
                kwargs["address"] = "local"
                kwargs["object_store_memory"] = wc.object_store_mb * 1024 * 1024
            ray.init(**kwargs)
        try:
            self.workers, self.use_gpu = worker_count(wc, ray.cluster_resources())
        except EvomergeError:
            if self.started_ray:  # no executor comes back: nobody else would shut Ray down
                ray.shutdown()
            raise
        self.faults = faults
        self.replacements = 0
        self._shardable: bool | None = None
        # A worker takes trials only once it has loaded its models and tasks: a trial's timeout
        # never counts a (replacement) worker's start-up, which a busy machine can make slow.
        self.starting: dict = {}  # ping ref -> (actor, started)
        self.slot: dict = {}  # actor -> its number (1..workers), which its replacement keeps
        self.joined: list = []  # started since the last `wait`: Ready events
        for slot in range(1, self.workers + 1):
            self._new_actor(slot)

    @property
    def actors(self) -> list:
        running = [r.worker for r in self.running.values()]
        return self.idle + running + [a for a, _ in self.starting.values()]

    def wait_ready(self) -> None:
        """Block until every worker has loaded its models and tasks (replacements included)."""
        while self.starting:
            done, _ = self.ray.wait(list(self.starting), num_returns=1, timeout=0.5)
            for ref in done:
                self._started(ref)
            self._start_timeouts()
        self.idle += self.joined
        self.joined = []

    def _new_actor(self, slot: int) -> None:
        wc = self.config.workers
        cls = self.ray.remote(TrialWorker).options(
            num_cpus=wc.cpus_per_worker,
            # Ray sets the actor's CUDA_VISIBLE_DEVICES to its own GPUs: there, "cuda" is
            # cuda:0..N-1, and the candidate splits its layers over them
            num_gpus=wc.gpus_per_worker if self.use_gpu else 0,
            max_restarts=0,
        )
        device = "cuda" if self.use_gpu else "cpu"
        actor = cls.remote(self.config.dump(), device, wc.cpus_per_worker, self.faults)
        self.slot[actor] = slot
        self.starting[actor.ping.remote()] = (actor, time.monotonic())  # type: ignore[attr-defined]

    def replace(self, worker, why: str) -> None:
        self.ray.kill(worker, no_restart=True)
        slot = self.slot.pop(worker)
        self.replacements += 1
        if self.replacements > 3 * self.workers + 3:
            raise EvomergeError(f"workers keep dying ({self.replacements} replaced); last: {why}")
        self._new_actor(slot)

    def _started(self, ref) -> None:
        """A worker's start-up ended: it is ready; or it died (replaced); or it raised, and the
        search stops."""
        actor, _ = self.starting.pop(ref)
        try:
            line = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as e:
            if not e.actor_init_failed:  # killed while loading (SIGKILL, a node lost)
                self.replace(actor, f"died while starting: {cause_line(str(e))}")
                return
            # TrialWorker.__init__ raised (CUDA out of memory loading the sources, a broken
            # install): every other attempt would read all the sources again to fail alike
            raise EvomergeError(self._start_failure(actor, str(e))) from e
        except Exception as e:  # noqa: BLE001 - e.g. its node unreachable: another may start
            self.replace(actor, f"failed to start: {cause_line(str(e))}")
            return
        self.say(f"{line} (slot {self.slot.get(actor, '?')} of {self.workers})")
        self.joined.append(actor)

    def _start_failure(self, actor, text: str) -> str:
        gpus = self.config.workers.gpus_per_worker
        where = f"cuda, {gpus} GPU{'s' * (gpus > 1)}" if self.use_gpu else "cpu"
        node = re.search(r"\bip=([\w.:-]+)", _ANSI.sub("", text))  # the failed task's node
        where += f", node {node.group(1)}" if node else ""
        who = f"worker {self.slot.pop(actor, '?')} of {self.workers} ({where})"
        return start_failure(who, text, "cuda" if self.use_gpu else "cpu", self.config)

    def _start_timeouts(self) -> None:
        limit = self.config.workers.start_timeout
        now = time.monotonic()
        for ref, (actor, started) in list(self.starting.items()):
            if now - started > limit:
                del self.starting[ref]
                self.replace(actor, f"no start within {limit:.0f} s")

    def shardable(self) -> bool:
        """Asked of a worker once: the tasks' aggregations decide."""
        if self._shardable is None:
            self.wait_ready()
            # a started worker: idle, or still running a trial nobody wants (it answers next)
            started = self.idle + [r.worker for r in self.running.values()]
            try:
                self._shardable = bool(self.ray.get(started[0].shardable.remote()))
            except (IndexError, self.ray.exceptions.RayActorError):
                # none answers now (it died: the stream replaces it): whole candidates this
                # time; shards change only which worker scores an item, never a score
                return False
        return self._shardable

    def launch(self, worker, trial: Trial):
        return worker.run.remote(trial)

    def cancel(self, job) -> None:
        self.ray.cancel(job)

    def wait(self) -> list:
        ray = self.ray
        done, _ = ray.wait([*self.running, *self.starting], num_returns=1, timeout=0.5)
        for ref in done:
            if ref in self.starting:
                self._started(ref)
        events: list = [Ready(a) for a in self.joined]
        self.joined = []
        for ref in done:
            if ref not in self.running:
                continue
            try:
                events.append(Done(ref, ray.get(ref)))
            except ray.exceptions.TaskCancelledError:
                events.append(Cancelled(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                events.append(Died(ref, cause_line(str(e))))
            except ray.exceptions.RayTaskError as e:
                events.append(Done(ref, TrialResult.failed(cause_line(str(e)))))
        self._start_timeouts()
        return events

    def shutdown(self) -> None:
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        if self.started_ray:
            self.ray.shutdown()


def make_executor(config: SearchConfig, faults: dict[str, str] | None = None) -> Executor:
    if config.workers.count == 0:
        return SerialExecutor(config, faults)
    return RayExecutor(config, faults)


def combine_trial(config: SearchConfig, parts: list[TrialResult]) -> TrialResult:
    """One candidate's result from its shards' (exact for mean metrics: see combine_shards)."""
    from evomerge.fitness.scorer import FitnessResult, combine_shards

    workers = ",".join(sorted({p.worker for p in parts}))
    busy: dict = dict(
        merge_seconds=sum(p.merge_seconds for p in parts),
        eval_seconds=sum(p.eval_seconds for p in parts),
    )
    failed = next((p for p in parts if p.status != Status.COMPLETE), None)
    if failed is not None:
        return TrialResult.failed(failed.error or "a shard failed", workers, **busy)
    specs = [
        s.model_copy(
            update={
                "metric": s.metric
                or next(k.split("/")[1] for k in parts[0].metrics if k.startswith(s.name + "/"))
            }
        )
        for s in config.fitness.tasks
    ]
    whole = combine_shards(
        specs,
        [
            FitnessResult(True, p.fitness, p.metrics, p.examples, p.eval_seconds, counts=p.counts)
            for p in parts
        ],
    )
    return TrialResult(
        Status.COMPLETE,
        whole.fitness,
        whole.metrics,
        examples=whole.examples,
        worker=workers,
        counts=whole.counts,
        **busy,
    )
