"""Score an in-memory model with lm-eval as often as its weights change: tasks loaded, the model
wrapped and requests built once (fitness/requests.py); only lm-eval's public API is used."""

from __future__ import annotations

import contextlib
import difflib
import functools
import io
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.fitness.tasks import TaskSpec
from evomerge.merge.errors import EvomergeError


@dataclass(frozen=True)
class FitnessResult:
    """The outcome of scoring one model: a typed success or a typed failure, never None."""

    ok: bool
    fitness: float  # weighted objective, higher is better; NaN when not ok
    metrics: dict[str, float] = field(default_factory=dict)  # "task/metric" -> value
    examples: int = 0
    seconds: float = 0.0
    error: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # task -> examples scored (for shards)
    # task -> each scored document's score on the task's metric, in the order asked (racing)
    scores: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def failed(cls, error: str, seconds: float = 0.0) -> FitnessResult:
        return cls(ok=False, fitness=math.nan, error=error, seconds=seconds)


def objective(specs: list[TaskSpec], metrics: dict[str, float]) -> float:
    """Weighted mean of the task metrics, each signed by its direction (maximized)."""
    total = sum(s.weight for s in specs) or 1.0
    value = sum(
        s.weight * (1 if s.direction == "maximize" else -1) * metrics[f"{s.name}/{s.metric}"]
        for s in specs
    )
    return value / total


def combine_shards(specs: list[TaskSpec], parts: list[FitnessResult]) -> FitnessResult:
    """The unsharded result from shard results, exactly, for mean-aggregated metrics.

    Each shard's per-task metric is a mean over its examples, so the whole is the count-weighted
    mean of the shard means. (Corpus-level aggregations such as BLEU or perplexity are not
    decomposable like this: `Scorer.shardable` is False for them and they are never sharded.)"""
    failed = next((p for p in parts if not p.ok), None)
    seconds = sum(p.seconds for p in parts)
    if failed is not None:
        return FitnessResult.failed(failed.error or "a shard failed", seconds)
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    for key in parts[0].metrics:
        task = key.split("/")[0]
        n = [p.counts[task] for p in parts]
        counts[task] = sum(n)
        metrics[key] = sum(p.metrics[key] * k for p, k in zip(parts, n, strict=True)) / sum(n)
    return FitnessResult(
        True, objective(specs, metrics), metrics, sum(counts.values()), seconds, counts=counts
    )


_MAX_GEN_TOKS = 256  # lm-eval HFLM's max_gen_toks, for a request that does not set its own


class _RequestBuilder:
    """What building requests reads of lm-eval's model wrapper (rank, world size, the chat
    template), without a model: the driver renders exactly the prompts a worker will."""

    rank = 0
    world_size = 1

    def __init__(self, tokenizer):
        from lm_eval.models.huggingface import HFLM

        self.tokenizer = tokenizer
        self.chat_template_args: dict = {}
        # HFLM's own rendering (with its retry without a system role), bound to this object
        self.apply_chat_template = functools.partial(HFLM.apply_chat_template, self)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")


class Scorer:
    """Tasks built once; `bind` a model once; `score` any number of times."""

    def __init__(
        self,
        tasks: list[TaskSpec],
        include_paths: list[Path] | None = None,
        limit: int | float | None = None,
        seed: int = 0,
        num_fewshot: int | None = None,
        batch_size: int = 64,
        apply_chat_template: bool = False,
        rescore_limit: int | float | None = None,
        part: str = "search",
    ):
        """`limit`: the items a candidate is scored on (a seeded subset; None: every item).
        Candidates may also be scored again on the `rescore` set: the `limit` subset plus
        seeded further items, up to `rescore_limit` (None: every item). A task with `holdout`
        offers only its `part` of the documents: "search" or "heldout"."""
        from lm_eval.tasks import TaskManager

        for name in ("lm_eval", "lm-eval", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.batch_size = batch_size
        self.apply_chat_template = apply_chat_template
        names = [t.name for t in tasks]
        paths = [str(p) for p in include_paths or []]
        # indexing the ~15k built-in tasks takes ~10 s: only when a name needs them
        tm = TaskManager(include_path=paths or None, include_defaults=not paths)
        if paths and not set(names) <= set(tm.all_tasks):
            tm = TaskManager(include_path=paths, include_defaults=True)
        unknown = []
        for name in names:
            if name not in tm.all_tasks:
                close = difflib.get_close_matches(name, tm.all_tasks, n=3)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                unknown.append(
                    f"task {name!r} not found; {hint}check the name or add its YAML directory "
                    "to the include paths"
                )
        if unknown:
            raise EvomergeError("\n".join(unknown))
        self.loaded = tm.load(names)
        groups = [n for n in names if n not in self.loaded["tasks"]]
        if groups:
            members = ", ".join(sorted(set(self.loaded["tasks"]) - set(names))[:8])
            raise EvomergeError(
                f"{groups[0]!r} is a group of tasks, not a task; list the tasks to score, each "
                f"with its weight (its tasks include: {members})"
            )
        # a spec without a metric takes its task's first one
        self.specs = [
            s if s.metric else s.model_copy(update={"metric": self._first_metric(s.name)})
            for s in tasks
        ]
        for task in self.loaded["tasks"].values():
            if num_fewshot is not None:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
        self.seed = seed
        self.docs = self._part_docs(part)  # every document a task may score, by task
        self.samples = self._subsets(limit, seed) if limit is not None else None
        self.rescore_samples = self._extend(self.samples, rescore_limit, seed)
        self.lm: Any = None  # lm-eval HFLM, set by `bind`
        self.requests: dict[str, list] = {}  # item set -> its built requests

    @property
    def shardable(self) -> bool:
        """True when every scored metric aggregates as a mean of per-example scores."""
        from lm_eval.api.metrics import mean

        return all(
            self.loaded["tasks"][s.name].aggregation().get(str(s.metric)) is mean
            for s in self.specs
        )

    def _part_docs(self, part: str) -> dict[str, list[int]]:
        from evomerge.fitness.tasks import holdout_split

        share = {s.name: s.holdout for s in self.specs}
        out = {}
        for name, task in self.loaded["tasks"].items():
            n = len(task.eval_docs)
            if (held := share.get(name)) is not None:
                search, heldout = holdout_split(name, n, held)
                out[name] = heldout if part == "heldout" else search
            else:
                out[name] = list(range(n))
        return out

    def items(self, which: str = "search") -> dict[str, list[int]]:
        """Each task's documents of an item set: `search` (the `limit` subset) or `rescore`."""
        chosen = self.samples if which == "search" else self.rescore_samples
        return {name: (chosen or self.docs)[name] for name in self.loaded["tasks"]}

    def shard(self, i: int, k: int, which: str = "search") -> dict[str, list[int]]:
        """Shard i of k: every k-th example of each task's item set, from the i-th."""
        return {name: docs[i::k] for name, docs in self.items(which).items()}

    def order(self, key: str, which: str = "search") -> dict[str, list[int]]:
        """Each task's item set in a random order seeded by `key` (racing scores a candidate
        along it, a prefix at a time: every prefix is a uniform sample without replacement)."""
        out = {}
        for name, docs in self.items(which).items():
            shuffled = list(docs)
            random.Random(f"{key}/{name}/order").shuffle(shuffled)
            out[name] = shuffled
        return out

    def _first_metric(self, name: str) -> str:
        metric_list = self.loaded["tasks"][name].config.metric_list or [{"metric": "acc"}]
        return str(metric_list[0]["metric"])

    def _subsets(self, limit: int | float, seed: int) -> dict[str, list[int]]:
        """A fixed, seeded subset of each task's documents (the same every call)."""
        out = {}
        for name, docs in self.docs.items():
            n = len(docs)
            k = int(limit * n) if isinstance(limit, float) and limit <= 1 else int(limit)
            rng = random.Random(f"{seed}/{name}")
            out[name] = sorted(docs[i] for i in rng.sample(range(n), min(max(k, 1), n)))
        return out

    def _extend(self, subset: dict[str, list[int]] | None, limit, seed: int) -> dict | None:
        """The rescore set: `subset` plus seeded further documents, up to `limit` per task."""
        if subset is None:
            return None
        if limit is None:
            return dict(self.docs)
        out = {}
        for name, docs in self.docs.items():
            n = len(docs)
            k = int(limit * n) if isinstance(limit, float) and limit <= 1 else int(limit)
            rest = sorted(set(docs) - set(subset[name]))
            random.Random(f"{seed}/{name}/rescore").shuffle(rest)
            out[name] = sorted([*subset[name], *rest[: max(0, k - len(subset[name]))]])
        return out

    def bind(self, model, tokenizer, device: str = "cpu") -> Scorer:
        """Wrap the resident model once; later in-place weight changes are seen by `score`."""
        from evomerge.fitness.requests import ReusableHFLM

        lm = ReusableHFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, device=device
        )
        return self.bind_lm(lm)

    def bind_lm(self, lm) -> Scorer:
        """Score through an lm-eval LM that holds the model itself (the vLLM backend's
        engine-backed wrapper, fitness/vllm_backend.py): requests are built as for `bind`."""
        self.lm = lm
        # prompts depend on the tasks and the seed, and on the tokenizer only through a chat
        # template: built once per item set unless one is applied
        if self.apply_chat_template:
            self.requests = {}
        self._requests("search")
        return self

    def _requests(self, which: str) -> list:
        """The built requests of an item set (built on first use, each set with the few-shot
        sampler seeded anew: the search set's prompts are those of a Scorer without rescoring)."""
        if which not in self.requests:
            self.requests[which] = self._build(which, self.lm)
        return self.requests[which]

    def _build(self, which: str, lm) -> list:
        from evomerge.fitness.requests import TaskRequests

        chosen = self.samples if which == "search" else self.rescore_samples
        # a task's whole set is built as lm-eval builds it (no sample list); a held-out
        # part never enters the search's requests
        subsets = chosen or {
            name: docs
            for name, docs in self.docs.items()
            if len(docs) != len(self.loaded["tasks"][name].eval_docs)
        }
        with contextlib.redirect_stderr(io.StringIO()):
            return [
                TaskRequests.build(
                    name, task, subsets.get(name), lm, self.seed, self.apply_chat_template
                )
                for name, task in self.loaded["tasks"].items()
            ]

    def longest_request(self, tokenizer, which: str = "search") -> tuple[int, int]:
        """(the longest input of an item set's requests in tokens of `tokenizer`, the most
        tokens any of its requests may generate): what sizes the KV cache and the logits of a
        worker scoring them (search/memory.py). The requests are built as a worker builds them,
        without a model, so this runs on the driver before any worker starts. Each count may
        exceed lm-eval's by a token (a BOS it skips) and is not truncated to the model's
        context: the memory plan caps it."""
        from lm_eval.models.utils import normalize_gen_kwargs

        inputs: set[str] = set()
        generate = 0
        for built in self._build(which, _RequestBuilder(tokenizer)):
            for instances in built.by_doc.values():
                for inst in instances:
                    if inst.request_type == "generate_until":
                        context, gen_kwargs = inst.args[0], inst.args[1]
                        gen = normalize_gen_kwargs(dict(gen_kwargs), _MAX_GEN_TOKS)
                        generate = max(generate, int(gen["max_gen_toks"]))
                        inputs.add(context)
                    else:  # loglikelihood: context + continuation; rolling: the whole text
                        inputs.add("".join(inst.args[:2]))
        longest = 0
        texts = sorted(inputs)
        for start in range(0, len(texts), 256):  # batches keep a large task's memory bounded
            ids = tokenizer(texts[start : start + 256], add_special_tokens=True)["input_ids"]
            longest = max([longest, *(len(i) for i in ids)])
        return longest, generate

    def score(
        self,
        samples: dict[str, list[int]] | None = None,
        which: str = "search",
        per_item: bool = False,
    ) -> FitnessResult:
        """Evaluate the bound model on an item set (only `samples` of it, a shard, when given);
        any exception or non-finite metric is a failed result. `per_item`: also return each
        document's score (`FitnessResult.scores`, in the order of `samples`)."""
        if self.lm is None:
            raise RuntimeError("Scorer.bind(model, tokenizer) first")
        from evomerge.fitness.requests import answer

        start = time.perf_counter()
        try:
            # lm-eval's request progress bars pass disable=False explicitly; keep them off the
            # terminal (errors still arrive as exceptions)
            with contextlib.redirect_stderr(io.StringIO()):
                per_doc: dict[str, dict[str, list]] | None = {} if per_item else None
                results = answer(self.lm, self._requests(which), samples, per_doc)
            metrics: dict[str, float] = {}
            scores: dict[str, list[float]] = {}
            for spec in self.specs:
                task_metrics, count = results[spec.name]
                metric = str(spec.metric)
                key = metric if "," in metric else f"{metric},none"
                value = task_metrics.get(key)
                if value is None and count == 0:
                    value = 0.0  # an empty shard: weighted by its count, 0, when combined
                if value is None:
                    raise KeyError(
                        f"task {spec.name} has no metric {spec.metric!r} ({list(task_metrics)})"
                    )
                metrics[f"{spec.name}/{spec.metric}"] = float(value)
                if per_doc is not None:
                    scores[spec.name] = [float(v) for v in per_doc[spec.name].get(key, [])]
            counts = {name: count for name, (_, count) in results.items()}
            examples = sum(counts.values())
        except Exception as e:  # a candidate's failure is data, not a crash
            return FitnessResult.failed(f"{type(e).__name__}: {e}", time.perf_counter() - start)
        seconds = time.perf_counter() - start
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            return FitnessResult(
                False, math.nan, metrics, examples, seconds, f"non-finite metric {bad[0]}"
            )
        return FitnessResult(
            True,
            objective(self.specs, metrics),
            metrics,
            examples,
            seconds,
            counts=counts,
            scores=scores,
        )
