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
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
    args = ap.parse_args()
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
