"""Per-candidate scoring time: tasks built once and reused, against rebuilt every call.

    python experiments/bench_fitness.py [--repeats 10]

On the demo zoo's add expert with the demo search's tasks (2 generation tasks x 100 items):
  reused:  one Scorer (tasks loaded once, model wrapped once), `score()` per candidate;
  rebuilt: `lm_eval.simple_evaluate` per candidate (tasks rebuilt each call).
Two shares of a reused score are reported: time in the model's forward passes (hooks on the
model), and time in the model calls lm-eval makes (forward passes plus Hugging Face
`generate`'s per-token loop: the HFLM instance's `_model_call` / `_model_generate` are timed
on this instance only, for this measurement); the rest is lm-eval's own work (requests,
batching, decoding, metrics).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from search import env  # noqa: E402

env.apply()


def main() -> None:
    import contextlib
    import io

    import lm_eval
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from fitness.models import load_model
    from fitness.scorer import Scorer
    from fitness.tasks import TaskSpec
    from fitness.zoo.build import build_zoo

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    zoo = build_zoo(size="demo")
    os.environ.setdefault("HF_DATASETS_CACHE", str(zoo / ".hf-datasets"))
    tasks = ["zoo_add_gen_search", "zoo_caps_gen_search"]
    model, tok = load_model(zoo / "llama" / "add")

    forward = [0.0]
    started: list[float] = []
    model.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    model.register_forward_hook(
        lambda *_: forward.__setitem__(0, forward[0] + time.perf_counter() - started.pop())
    )

    t0 = time.perf_counter()
    scorer = Scorer([TaskSpec(name=t) for t in tasks], include_paths=[zoo / "tasks"], limit=100,
                    batch_size=100).bind(model, tok)  # fmt: skip
    build = time.perf_counter() - t0
    calls = [0.0]
    for name in ("_model_call", "_model_generate"):
        inner = getattr(scorer.lm, name)

        def timed(*a, _inner=inner, **kw):
            t = time.perf_counter()
            try:
                return _inner(*a, **kw)
            finally:
                calls[0] += time.perf_counter() - t

        setattr(scorer.lm, name, timed)
    scorer.score()  # warm-up
    reused, outside, harness = [], [], []
    for _ in range(args.repeats):
        forward[0] = calls[0] = 0.0
        r = scorer.score()
        reused.append(r.seconds)
        outside.append((r.seconds - forward[0]) / r.seconds)
        harness.append((r.seconds - calls[0]) / r.seconds)
    rebuilt = []
    samples = scorer.samples
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=100, device="cpu")
    for _ in range(min(args.repeats, 5)):
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            tm = TaskManager(include_path=str(zoo / "tasks"), include_defaults=False)
            lm_eval.simple_evaluate(model=lm, tasks=tasks, samples=samples, bootstrap_iters=0,
                                    log_samples=False, task_manager=tm)  # fmt: skip
        rebuilt.append(time.perf_counter() - t0)
    print(f"scorer build (tasks + model wrap, once per worker): {build:.2f} s")
    print(
        f"per candidate, tasks reused:  {statistics.median(reused):.3f} s (median of {len(reused)})"
    )
    print(
        f"per candidate, tasks rebuilt: {statistics.median(rebuilt):.3f} s (median of {len(rebuilt)})"
    )
    print(
        f"reused: time outside the model's forward passes {100 * statistics.median(outside):.1f} % "
        "of scoring time"
    )
    print(
        "reused: time outside the model calls (forward + generate loop), i.e. lm-eval's own "
        f"work: {100 * statistics.median(harness):.1f} % of scoring time"
    )


if __name__ == "__main__":
    main()
