"""Per-candidate scoring time: the Scorer's built-once requests against lm-eval rebuilding them.

    python experiments/bench_fitness.py [--repeats 10] [--batch-size 100] [--tasks A,B]
                                        [--threads 1] [--hidden H --layers L]

On the demo zoo's add expert with the demo search's tasks (2 generation tasks x 100 items):
  reused:  one Scorer (tasks loaded, model wrapped and requests built once), `score()` per
           candidate;
  rebuilt: `lm_eval.simple_evaluate` per candidate (tasks and requests rebuilt each call).
Two shares of a reused score are reported: the time outside the model's forward passes (forward
hooks on the model), and the time outside the model calls lm-eval makes (the forward passes plus
Hugging Face `generate`'s decoding loop around them: this HFLM instance's `_model_call` /
`_model_generate` are timed, for this measurement only); the rest is the harness (requests,
batching, filters, metrics).

`--hidden H --layers L` scores a randomly initialised Llama of that size instead (the zoo's
tokenizer and tasks; it generates to `max_gen_toks`), to show how the shares move with model size.

    python experiments/bench_fitness.py --backends hf,vllm [--repeats 5] [--threads 1]
                                        [--hidden 512 --layers 8]

compares the fitness backends in one run (vLLM needs `.venv-vllm`: `make setup-vllm`), each
scoring the same candidates with its requests built once, on two models: the demo zoo with the
demo's three generation tasks (candidates: task-arithmetic merges of its five Llamas) and a
random-weight Llama of `--hidden`/`--layers` (default 33.6M parameters; the zoo's tokenizer;
candidates: a linear merge of it with itself, which is itself) on a generation task that always
runs to 32 new tokens (its stop sequence is one the model never writes, and the head's rows of
the special tokens are zeroed, so it never ends early). Per backend: seconds to score a
candidate, the mean tokens generated per answer, and for vLLM the
seconds to write one into the engine (merged from the resident sources by merge_stream, and the
reload alone); the HF row's merge is into its resident model (ResidentSources.materialize).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import time
from pathlib import Path

from evomerge.search import env  # noqa: E402

env.apply()


def _timed(owner, name: str, total: list[float]) -> None:
    inner = getattr(owner, name)

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            total[0] += time.perf_counter() - t

    setattr(owner, name, timed)


def _model(zoo: Path, hidden: int, layers: int):
    from evomerge.fitness.models import load_model

    model, tok = load_model(zoo / "llama" / "add")
    if not hidden:
        return model, tok
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **{
            **model.config.to_dict(),
            "hidden_size": hidden,
            "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": max(hidden // 64, 1),
            "num_key_value_heads": max(hidden // 64, 1),
        }
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tok


FIXED_TASK = """task: bench_fixed_gen
dataset_path: json
dataset_kwargs: {data_files: {test: DATA}}
output_type: generate_until
test_split: test
doc_to_text: prompt
doc_to_target: answer
target_delimiter: ""
generation_kwargs: {until: ["@@never@@"], max_gen_toks: 32, do_sample: false}
metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
"""


def _random_llama(zoo: Path, out: Path, hidden: int, layers: int) -> Path:
    """A random-weight Llama of the zoo's vocabulary in a model directory (the zoo's tokenizer),
    whose head never picks a special token (their rows zeroed: a random logit row's maximum is
    above zero), so greedy generation runs to the task's max_gen_toks."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from evomerge.fitness.zoo.tokenizer import SPECIALS

    base = AutoConfig.from_pretrained(zoo / "llama" / "base", trust_remote_code=False)
    cfg = LlamaConfig(
        **{
            **base.to_dict(),
            "hidden_size": hidden,
            "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": max(hidden // 64, 1),
            "num_key_value_heads": max(hidden // 64, 1),
            "head_dim": 64 if hidden >= 64 else hidden,
            "max_position_embeddings": 128,
        }
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[: len(SPECIALS)] = 0
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(zoo / "llama" / "base" / name, out / name)
    return out


def compare(args) -> None:
    """Both backends side by side on the same candidates (see the module docstring)."""
    import statistics
    import tempfile

    import torch

    from evomerge.fitness.models import empty_model, load_tokenizer
    from evomerge.fitness.scorer import Scorer
    from evomerge.fitness.tasks import TaskSpec
    from evomerge.fitness.zoo.build import build_zoo
    from evomerge.merge.engine import merge_stream
    from evomerge.merge.placement import Placement
    from evomerge.merge.recipe import Recipe
    from evomerge.merge.resident import ResidentSources

    backends = args.backends.split(",")
    torch.set_num_threads(args.threads)
    zoo = build_zoo(size="demo", log=lambda *_: None)
    os.environ.setdefault("HF_DATASETS_CACHE", str(zoo / ".hf-datasets"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-fitness-"))
    hidden, layers = (args.hidden, args.layers) if args.hidden else (512, 8)
    big = _random_llama(zoo, tmp / "random-llama", hidden, layers)
    (tmp / "tasks").mkdir()
    data = str(zoo / "data" / "add_search.jsonl")
    (tmp / "tasks" / "bench_fixed_gen.yaml").write_text(FIXED_TASK.replace("DATA", data))
    demo_models = {a: zoo / "llama" / a for a in ("base", "add", "caps", "script", "next")}
    setups = [
        (
            "demo zoo (4 layers, hidden 128)",
            demo_models,
            ["zoo_add_gen_search", "zoo_caps_gen_search", "zoo_sadd_gen_search"],
            zoo / "tasks",
        ),
        (
            f"random Llama ({layers} layers, hidden {hidden})",
            {"base": big, "copy": big},
            ["bench_fixed_gen"],
            tmp / "tasks",
        ),
    ]
    med = statistics.median
    print(
        f"{args.threads} torch thread(s), batch size {args.batch_size}, {args.repeats} candidates"
    )
    print(
        "| model | parameters | backend | score s/candidate | tokens/answer | merge+write s "
        "| write s |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for label, models, tasks, include in setups:
        sources = ResidentSources(models, "base", "cpu")
        names = sources.models["base"].names
        params = sum(math.prod(sources.models["base"].shape(n)) for n in names)
        experts = [a for a in models if a != "base"]
        recipes = [
            Recipe.parse(
                {
                    "dtype": "float32",
                    "models": {a: {"path": str(p)} for a, p in models.items()},
                    "parameter_space": (
                        {
                            "method": "task_arithmetic",
                            "base": "base",
                            "groups": [
                                {
                                    "layers": [0, 4],
                                    "params": {
                                        e: {"weight": 0.2 + 0.1 * ((i + j) % 5)}
                                        for j, e in enumerate(experts)
                                    },
                                }
                            ],
                        }
                        if "add" in models
                        else {
                            "method": "linear",
                            "groups": [
                                {
                                    "layers": [0, layers],
                                    "params": {a: {"weight": 0.5} for a in models},
                                }
                            ],
                        }
                    ),
                }
            )
            for i in range(args.repeats + 1)
        ]
        specs = [TaskSpec(name=t) for t in tasks]
        tok = load_tokenizer(models["base"])
        for backend in backends:
            scorer = Scorer(specs, include_paths=[include], limit=100, batch_size=args.batch_size)
            writes, merges, scores = [], [], []
            if backend == "vllm":
                from evomerge.fitness.vllm_backend import Engine, engine_lm

                t0 = time.perf_counter()
                engine = Engine(models["base"], "float32", max_num_seqs=args.batch_size)
                started = time.perf_counter() - t0
                scorer.bind_lm(engine_lm(engine, tok, args.batch_size))
            else:
                placement = Placement(("cpu",), sources.models["base"].info.num_layers)
                model = empty_model(models["base"], "float32", placement)
                scorer.bind(model, tok)
            for i, recipe in enumerate(recipes):
                t0 = time.perf_counter()
                if backend == "vllm":
                    stream = merge_stream(recipe, sources.models, "cpu", workers=sources.workers)
                    tensors = [(j.name, t) for j, t in stream]
                    t1 = time.perf_counter()
                    engine.write(iter(tensors))
                    t2 = time.perf_counter()
                    merged, written = t2 - t0, t2 - t1
                else:
                    sources.materialize(recipe, model)
                    merged, written = time.perf_counter() - t0, math.nan
                result = scorer.score()
                assert result.ok, result.error
                if i:  # the first candidate warms up
                    merges.append(merged)
                    writes.append(written)
                    scores.append(result.seconds)
            answers = [
                inst.resps[0]
                for built in scorer._requests("search")
                for insts in built.by_doc.values()
                for inst in insts
            ]
            length = sum(len(tok(a, add_special_tokens=False).input_ids) for a in answers)
            extra = f" (engine start {started:.1f} s)" if backend == "vllm" else ""
            print(
                f"| {label} | {params / 1e6:.1f}M | {backend}{extra} | {med(scores):.3f} | "
                f"{length / len(answers):.1f} | {med(merges):.3f} | {med(writes):.3f} |"
            )
            if backend == "vllm":
                engine.close()


def main() -> None:
    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evomerge.fitness.scorer import Scorer
    from evomerge.fitness.tasks import TaskSpec
    from evomerge.fitness.zoo.build import build_zoo

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--tasks", default="zoo_add_gen_search,zoo_caps_gen_search")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: as the demo's workers, cpus_per_worker 1)",
    )
    ap.add_argument(
        "--backends",
        default="",
        help="hf,vllm: compare the fitness backends on the zoo and a random Llama (see above)",
    )
    args = ap.parse_args()
    if args.backends:
        return compare(args)
    torch.set_num_threads(args.threads)
    zoo = build_zoo(size="demo")
    os.environ.setdefault("HF_DATASETS_CACHE", str(zoo / ".hf-datasets"))
    tasks = args.tasks.split(",")
    model, tok = _model(zoo, args.hidden, args.layers)
    params = sum(p.numel() for p in model.parameters())

    forward = [0.0]
    started: list[float] = []
    model.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    model.register_forward_hook(
        lambda *_: forward.__setitem__(0, forward[0] + time.perf_counter() - started.pop())
    )

    t0 = time.perf_counter()
    scorer = Scorer(
        [TaskSpec(name=t) for t in tasks],
        include_paths=[zoo / "tasks"],
        limit=100,
        batch_size=args.batch_size,
    ).bind(model, tok)
    build = time.perf_counter() - t0
    calls = [0.0]
    for name in ("_model_call", "_model_generate"):
        _timed(scorer.lm, name, calls)
    scorer.score()  # warm-up
    reused, outside, harness = [], [], []
    for _ in range(args.repeats):
        forward[0] = calls[0] = 0.0
        r = scorer.score()
        reused.append(r.seconds)
        outside.append((r.seconds - forward[0]) / r.seconds)
        harness.append((r.seconds - calls[0]) / r.seconds)
    rebuilt = []
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device="cpu")
    for _ in range(min(args.repeats, 5)):
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            tm = TaskManager(include_path=str(zoo / "tasks"), include_defaults=False)
            lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                samples=scorer.samples,
                bootstrap_iters=0,
                log_samples=False,
                task_manager=tm,
            )
        rebuilt.append(time.perf_counter() - t0)
    med = statistics.median
    print(
        f"model: {params / 1e6:.2f}M parameters, {r.examples} examples per candidate, "
        f"batch size {args.batch_size}, {args.threads} torch thread(s)"
    )
    print(f"scorer build (tasks, model wrap, requests; once per worker): {build:.2f} s")
    print(f"per candidate, requests reused: {med(reused):.3f} s (median of {len(reused)})")
    print(
        f"per candidate, tasks rebuilt (simple_evaluate): {med(rebuilt):.3f} s "
        f"(median of {len(rebuilt)})"
    )
    print(
        f"reused: outside the model's forward passes {100 * med(outside):.1f} % of scoring "
        f"time ({1e3 * med(outside) * med(reused) / r.examples:.3f} ms per example)"
    )
    print(
        f"reused: outside the model calls (forward passes + generate's decoding loop), i.e. "
        f"the harness: {100 * med(harness):.1f} % "
        f"({1e3 * med(harness) * med(reused) / r.examples:.3f} ms per example)"
    )


if __name__ == "__main__":
    main()
