"""Requests built once (fitness/requests.py): the prompts, outputs and metrics of lm-eval's own
evaluation, on every call and every shard."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.fitness.models import load_model
from evomerge.fitness.scorer import Scorer, combine_shards
from evomerge.fitness.tasks import TaskSpec
from evomerge.merge.errors import EvomergeError

MC = "zoo_caps_mc_search"


def _filtered_task(tiny_zoo, tmp_path) -> str:
    """The add generation task with a two-step filter pipeline (regex, then take_first)."""
    text = (tiny_zoo / "tasks" / "zoo_add_gen_search.yaml").read_text()
    (tmp_path / "filtered.yaml").write_text(
        text.replace("task: zoo_add_gen_search", "task: zoo_add_filtered").replace(
            "include: _zoo_gen.yaml", f"include: {tiny_zoo / 'tasks' / '_zoo_gen.yaml'}"
        )
        + "filter_list:\n  - name: first_char\n    filter:\n"
        "      - function: regex\n        regex_pattern: '(.)'\n      - function: take_first\n"
    )
    return "zoo_add_filtered"


def test_prompts_outputs_and_metrics_equal_simple_evaluate(tiny_zoo, tmp_path):
    """Few-shot prompts, filtered outputs per document and metrics, against simple_evaluate with
    the same few-shot seed and documents."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    gen = _filtered_task(tiny_zoo, tmp_path)
    specs = [TaskSpec(name=gen, metric="exact_match,first_char"), TaskSpec(name=MC)]
    paths = [tmp_path, tiny_zoo / "tasks"]
    scorer = Scorer(specs, include_paths=paths, limit=12, seed=3, num_fewshot=2, batch_size=8)
    model, tok = load_model(tiny_zoo / "llama" / "add")
    ours = scorer.bind(model, tok).score()
    assert ours.ok, ours.error
    ref = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu"),
        tasks=[gen, MC],
        samples=scorer.samples,
        num_fewshot=2,
        fewshot_random_seed=3,
        bootstrap_iters=0,
        log_samples=True,
        task_manager=TaskManager(include_path=[str(p) for p in paths], include_defaults=False),
    )
    assert (
        ours.metrics[f"{gen}/exact_match,first_char"]
        == ref["results"][gen]["exact_match,first_char"]
    )
    assert ours.metrics[f"{MC}/acc"] == ref["results"][MC]["acc,none"]
    built = {t.name: t for t in scorer.requests["search"]}
    for task in (gen, MC):
        logged = ref["samples"][task]
        assert sorted(s["doc_id"] for s in logged) == scorer.samples[task]
        for s in logged:
            insts = built[task].by_doc[s["doc_id"]]
            assert [i.args for i in insts] == s["arguments"]
            assert "\n\n" in insts[0].args[0]  # two few-shot examples precede the question
            assert [i.filtered_resps[s["filter"]] for i in insts] == s["filtered_resps"]


def test_few_shot_prompts_are_fixed_across_calls_and_shards(tiny_zoo):
    scorer = Scorer(
        [TaskSpec(name="zoo_add_gen_search"), TaskSpec(name=MC)],
        include_paths=[tiny_zoo / "tasks"],
        limit=20,
        num_fewshot=3,
        batch_size=8,
    )
    model, tok = load_model(tiny_zoo / "llama" / "caps")
    whole = scorer.bind(model, tok).score()
    parts = [scorer.score(scorer.shard(i, 3)) for i in range(3)]
    assert combine_shards(scorer.specs, parts).metrics == pytest.approx(whole.metrics, abs=1e-12)
    assert scorer.score().metrics == whole.metrics
    # a second bind (a worker's next model) keeps the built prompts
    requests = scorer.requests["search"]
    scorer.bind(*load_model(tiny_zoo / "llama" / "caps"))
    assert scorer.requests["search"] is requests and scorer.score().metrics == whole.metrics


def test_empty_shard_counts_zero(tiny_zoo):
    scorer = Scorer(
        [TaskSpec(name="zoo_add_gen_search")], include_paths=[tiny_zoo / "tasks"], limit=2
    )
    scorer.bind(*load_model(tiny_zoo / "llama" / "base"))
    parts = [scorer.score(scorer.shard(i, 3)) for i in range(3)]
    assert [p.examples for p in parts] == [1, 1, 0] and all(p.ok for p in parts)
    assert combine_shards(scorer.specs, parts).metrics == scorer.score().metrics


def test_a_group_is_refused_with_its_tasks(tiny_zoo, tmp_path):
    (tmp_path / "group.yaml").write_text(
        "group: zoo_both\ntask:\n  - zoo_add_gen_search\n  - zoo_caps_gen_search\n"
    )
    with pytest.raises(EvomergeError, match="'zoo_both' is a group.*zoo_add_gen_search"):
        Scorer([TaskSpec(name="zoo_both")], include_paths=[tmp_path, tiny_zoo / "tasks"])


@pytest.fixture(scope="module")
def tokenizer(tiny_zoo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_zoo / "llama" / "base")


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_stop_rule_decides_as_lm_eval(tokenizer, data):
    """At every decoding step, the memoized stop rule gives lm-eval's verdict."""
    from lm_eval.models.utils_hf import stop_sequences_criteria

    from evomerge.fitness.requests import _Memo, _StopSequences

    stops = data.draw(
        st.lists(
            st.sampled_from(["\n", "ab", "=?", "c", "\n\n", "s>a"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    batch, prompt, length = data.draw(
        st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 12))
    )
    vocab = [tokenizer.convert_tokens_to_ids(c) for c in "abc=?\n"] + [tokenizer.bos_token_id]
    ids = torch.tensor(
        data.draw(
            st.lists(
                st.lists(
                    st.sampled_from(vocab), min_size=prompt + length, max_size=prompt + length
                ),
                min_size=batch,
                max_size=batch,
            )
        )
    )
    theirs = stop_sequences_criteria(tokenizer, stops, prompt, batch)
    ours = _StopSequences(stops, tokenizer, prompt, batch, decoded=_Memo())
    for t in range(prompt + 1, prompt + length + 1):
        want = any(bool(torch.as_tensor(c(ids[:, :t], None)).all()) for c in theirs)
        assert ours(ids[:, :t], None) == want, t


def test_memo_empties_itself_past_its_size_limit():
    from evomerge.fitness.requests import _Memo

    memo = _Memo(10, size=len)
    calls = []
    for key in ["aaaa", "bbbb", "aaaa", "cccc", "aaaa"]:
        assert memo.get_or(key, lambda k=key: calls.append(k) or k * 1) == key
    # a, b (8 units); a again from the memo; c would pass 10: cleared, then a computed anew
    assert calls == ["aaaa", "bbbb", "cccc", "aaaa"] and memo.total == 8


@pytest.mark.parametrize("task", ["zoo_add_gen_search", MC])
def test_a_cancelled_score_stops_at_the_next_batch(tiny_zoo, task):
    """The executor's cancel flag is read before every batch (generation and loglikelihood):
    once set, the call ends with Cancelled instead of running the remaining batches."""
    scorer = Scorer([TaskSpec(name=task)], include_paths=[tiny_zoo / "tasks"], batch_size=1)
    scorer.bind(*load_model(tiny_zoo / "llama" / "base"))
    asked = []
    scorer.lm.cancelled = lambda: asked.append(1) or len(asked) > 2
    result = scorer.score()
    assert not result.ok and result.error.startswith("Cancelled")
    assert len(asked) == 3  # two batches ran, the third was refused
    scorer.lm.cancelled = lambda: False
    assert scorer.score().ok
