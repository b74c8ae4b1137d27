"""A task's requests, built once and answered again for every candidate.

`lm_eval.evaluator.evaluate` renders every prompt again on each call (Jinja compiled per
document, few-shot contexts), which on a small model cost more than the model. Here, per
candidate, the responses are reset and the model, the task's filters, `process_results` and
the aggregation run: `evaluate`'s loop for one rank, through the Task's public methods (the
tests hold it equal to `lm_eval.simple_evaluate`). Building once, the few-shot sampler seeded
just before, also gives every call and shard the same prompts: lm-eval's sampler draws from one
generator across builds.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import transformers
from lm_eval.api.filter import FilterEnsemble
from lm_eval.api.instance import Instance
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask
from lm_eval.filters import build_filter_ensemble
from lm_eval.models.huggingface import HFLM

from evomerge.merge.errors import EvomergeError


class _Memo(dict):
    """A memo that empties itself when its values' total size passes `limit`: a guard against
    unbounded growth, far above a task set's distinct strings. `size` weighs a value (1 each by
    default)."""

    def __init__(self, limit: int = 500_000, size=lambda value: 1):
        super().__init__()
        self.limit, self.size, self.total = limit, size, 0

    def get_or(self, key, compute):
        value = self.get(key)
        if value is None:
            value = compute()
            if self.total + self.size(value) > self.limit:
                self.clear()
                self.total = 0
            self[key] = value
            self.total += self.size(value)
        return value


class _StopSequences(transformers.StoppingCriteria):
    """lm-eval's stop rule (`MultiTokenEOSCriteria`, one per stop sequence), each distinct
    lookback window decoded once.

    lm-eval decodes the last few generated tokens of every sequence at every step; on a small
    model that was a third of the decoding loop. The decisions are the same: the same windows,
    decoded by the same tokenizer with the same defaults. As in lm-eval, generation ends when
    every sequence has produced one same stop sequence (HF ORs the criteria's scalar verdicts)."""

    def __init__(
        self, sequences: list[str], tokenizer, start: int, batch_size: int, decoded: _Memo
    ):
        # lm-eval looks back 2 tokens more than the stop sequence's own tokenization
        self.rules = [
            (s, len(tokenizer.encode(s, add_special_tokens=False)) + 2) for s in sequences
        ]
        self.done = [[False] * batch_size for _ in sequences]
        self.tokenizer, self.start, self.decoded = tokenizer, start, decoded

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        generated = input_ids[:, self.start :].tolist()
        verdict = False
        for (sequence, lookback), done in zip(self.rules, self.done, strict=True):
            for i, ids in enumerate(generated):
                if not done[i]:
                    window = tuple(ids[-lookback:])
                    text = self.decoded.get_or(window, partial(self.tokenizer.decode, list(window)))
                    done[i] = sequence in text
            verdict = verdict or all(done)
        return verdict


class Cancelled(Exception):
    """A trial stopped between batches because nobody wants its result any more."""


class ReusableHFLM(HFLM):
    """lm-eval's HF wrapper with tokenization, decoding (its outputs' and the stop rule's) and the
    context length memoized: HFLM tokenizes every request on every call, and a search's prompts
    and tokenizer never change. Generation is HFLM's own, with `_StopSequences` as its stop."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # checked before every batch: True stops the call with Cancelled (a racing chunk whose
        # candidate was decided meanwhile frees its worker at the next batch)
        self.cancelled: Callable[[], bool] = lambda: False
        self._encoded = _Memo()
        # padded batches (ids and mask): at most 2^25 token slots, 512 MB of int64
        self._batches = _Memo(1 << 25, size=lambda batch: batch[0].numel())
        self._texts = _Memo()  # tok_decode
        self._windows = _Memo()  # the stop rule's lookback windows

    @property
    def max_length(self) -> int:
        # HFLM resolves it from the model config on every loglikelihood request; it is fixed for
        # a bound model (HFLM.__init__ may ask before this instance's attributes exist)
        if getattr(self, "_resolved_max_length", None) is None:
            self._resolved_max_length = super().max_length
        return self._resolved_max_length

    def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
        key = (string, add_special_tokens, left_truncate_len, tuple(sorted(kwargs.items())))
        encode = partial(
            super().tok_encode, string, add_special_tokens, left_truncate_len, **kwargs
        )
        return list(self._encoded.get_or(key, encode))

    def tok_batch_encode(
        self, strings, padding_side="left", left_truncate_len=None, truncation=False
    ):
        key = (tuple(strings), padding_side, left_truncate_len, truncation)
        encode = partial(
            super().tok_batch_encode, strings, padding_side, left_truncate_len, truncation
        )
        ids, mask = self._batches.get_or(key, encode)
        return ids.clone(), mask.clone()

    def tok_decode(self, tokens, skip_special_tokens: bool = True):
        # a candidate's outputs mostly repeat the last one's; HFLM also decodes single ids
        key = (tokens if isinstance(tokens, int) else tuple(tokens), skip_special_tokens)
        return self._texts.get_or(key, partial(super().tok_decode, tokens, skip_special_tokens))

    def _model_call(self, inps, attn_mask=None, labels=None):
        self._check_cancelled()
        return super()._model_call(inps, attn_mask, labels)

    def _check_cancelled(self) -> None:
        if self.cancelled():
            raise Cancelled("the executor cancelled this trial")

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        self._check_cancelled()
        # temperature 0 without do_sample means greedy, as in HFLM._model_generate
        generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
        do_sample = generation_kwargs.get("do_sample")
        if (temp := generation_kwargs.get("temperature")) == 0.0 and do_sample is None:
            generation_kwargs["do_sample"] = do_sample = False
        if do_sample is False and temp == 0.0:
            generation_kwargs.pop("temperature", None)
        stopping = transformers.StoppingCriteriaList(
            [
                _StopSequences(
                    stop, self.tokenizer, context.shape[1], context.shape[0], self._windows
                )
            ]
        )
        dtype = getattr(self, "mixed_precision_dtype", None)
        with torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None):
            return self.model.generate(
                input_ids=context,
                max_length=max_length,
                stopping_criteria=stopping,
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=True,
                **generation_kwargs,
            )


def task_filters(task: ConfigurableTask) -> list[FilterEnsemble]:
    """The task's filter pipelines, built from its config as ConfigurableTask builds them.

    Built here rather than run through `task.apply_filters()` because that filters every built
    instance, and a shard runs the model on only some of them."""
    if task.config.filter_list is None:
        return [build_filter_ensemble("none", [("take_first", None)])]
    return [
        build_filter_ensemble(
            f["name"],
            [
                (fn["function"], {k: v for k, v in fn.items() if k != "function"})
                for fn in f["filter"]
            ],
        )
        for f in task.config.filter_list
    ]


@dataclass
class TaskRequests:
    """One task's built requests, by document id (the dataset's index)."""

    name: str
    task: ConfigurableTask
    by_doc: dict[int, list[Instance]]  # document id -> its requests, in `idx` order (build order)
    filters: list[FilterEnsemble]

    @classmethod
    def build(
        cls, name: str, task, doc_ids: list[int] | None, lm, seed: int, apply_chat_template: bool
    ) -> TaskRequests:
        if not isinstance(task, ConfigurableTask):
            raise EvomergeError(
                f"task {name!r} is a {type(task).__name__}, not a "
                "ConfigurableTask; define it in YAML"
            )
        task.set_fewshot_seed(seed=seed)  # reseeded, so the prompts do not depend on history
        # lm-eval yields sampled documents in dataset order, numbered by position: sort to match
        doc_ids = sorted(doc_ids) if doc_ids else None
        task.build_all_requests(
            samples=doc_ids,
            rank=lm.rank,
            world_size=lm.world_size,
            apply_chat_template=apply_chat_template,
            chat_template=lm.apply_chat_template if apply_chat_template else None,
            tokenizer_name=lm.tokenizer_name if apply_chat_template else "",
        )
        by_doc: dict[int, list[Instance]] = defaultdict(list)
        for inst in task.instances:  # doc_id is the position within `doc_ids` when given
            assert inst.doc_id is not None
            by_doc[doc_ids[inst.doc_id] if doc_ids is not None else inst.doc_id].append(inst)
        for insts in by_doc.values():
            insts.sort(key=lambda x: x.idx)
        return cls(name, task, dict(by_doc), task_filters(task))


def answer(
    lm,
    tasks: list[TaskRequests],
    samples: dict[str, list[int]] | None = None,
    per_doc: dict[str, dict[str, list]] | None = None,
) -> dict[str, tuple[dict[str, float], int]]:
    """Run the model on the tasks' requests (only `samples`' documents when given) and return,
    per task, its aggregated metrics ("metric,filter" -> value) and the documents scored.
    `per_doc`, when given, receives each task's per-document scores ("metric,filter" -> one
    value per document, in the order the documents were asked for)."""
    chosen = {t.name: list(t.by_doc) if samples is None else samples[t.name] for t in tasks}
    by_type: dict[str, list[Instance]] = defaultdict(list)
    for t in tasks:
        for d in chosen[t.name]:
            if d not in t.by_doc:
                raise KeyError(f"task {t.name}: document {d} is not in the built set")
            for inst in t.by_doc[d]:
                inst.resps, inst.filtered_resps = [], {}
                by_type[inst.request_type].extend([inst] * (inst.repeats or 1))
    with torch.no_grad():
        for reqtype, reqs in by_type.items():
            for resp, req in zip(getattr(lm, reqtype)(reqs), reqs, strict=True):
                req.resps.append(resp)
    out: dict[str, tuple[dict[str, float], int]] = {}
    for t in tasks:
        docs = chosen[t.name]
        if not docs:  # a small shard, or a chunk a whole batch left empty: nothing here
            out[t.name] = ({}, 0)
            if per_doc is not None:
                per_doc[t.name] = {}
            continue
        instances = [inst for d in docs for inst in t.by_doc[d]]
        for pipeline in t.filters:
            pipeline.apply(instances)
        raw: dict[tuple[str, str], list] = defaultdict(list)
        for key in instances[0].filtered_resps:
            for d in docs:
                reqs = t.by_doc[d]
                scores = t.task.process_results(reqs[0].doc, [r.filtered_resps[key] for r in reqs])
                for metric, value in scores.items():
                    raw[metric, key].append(value)
        aggregation = t.task.aggregation()
        metrics = {
            f"{m},{key}": float(aggregation.get(m, mean)(values))
            for (m, key), values in raw.items()
        }
        out[t.name] = (metrics, len(docs))
        if per_doc is not None:
            per_doc[t.name] = {f"{m},{key}": values for (m, key), values in raw.items()}
    return out
