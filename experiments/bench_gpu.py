"""A worker's merge on a GPU: sources resident on the device vs streamed from pinned host memory.

    python experiments/bench_gpu.py [--params 5e8] [--out FILE]

For a synthetic bf16 Llama family (base + 2 experts) it builds the worker's structures on
cuda:0 both ways (`workers.sources: device` and `host`) and prints, per mode: the load time and
rate, the GPU bytes resident after the load and the peak while one candidate merges (as x one
model's bf16 bytes), and seconds per candidate for TIES, task arithmetic and DARE-TIES (the
fastest of --repeats, after one warm-up that also compiles TIES). In host mode every candidate
moves all three models' bytes over PCIe: the effective rate is printed beside it. Needs CUDA;
experiments/gpu_check.sh runs it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from evomerge.merge.placement import Placement
from evomerge.merge.recipe import Recipe
from evomerge.merge.synthetic import make_family

METHODS = ("ties", "task_arithmetic", "dare_ties")


def family(root: Path, params: float) -> tuple[dict[str, Path], int]:
    hidden, inter, vocab = 2048, 5632, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    paths = make_family(
        root,
        "llama",
        experts=2,
        dtype=torch.bfloat16,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    return paths, layers


def recipe(paths: dict[str, Path], method: str, layers: int) -> Recipe:
    params = {
        a: {"weight": 0.6, "density": 0.5} if "ties" in method else {"weight": 0.6}
        for a in paths
        if a != "base"
    }
    return Recipe.parse(
        {
            "dtype": "bfloat16",
            "models": {a: {"path": str(p)} for a, p in paths.items()},
            "parameter_space": {
                "method": method,
                "base": "base",
                "seed": 3,
                "groups": [{"layers": [0, layers], "params": params}],
            },
        }
    )


def measure(paths, layers: int, where: str, repeats: int) -> dict:
    from evomerge.fitness.models import empty_model
    from evomerge.merge.resident import ResidentSources

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    start_bytes = torch.cuda.memory_allocated()
    placement = Placement(("cuda:0",), layers)
    t = time.perf_counter()
    sources = ResidentSources(paths, "base", placement, where)  # type: ignore[arg-type]
    model = empty_model(paths["base"], "bfloat16", placement)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    one = sum(p.numel() for p in model.parameters()) * 2
    resident = torch.cuda.memory_allocated() - start_bytes
    row: dict = {
        "mode": where,
        "load_s": load_s,
        "load_GBps": sources.nbytes() / load_s / 1e9,
        "resident_x": resident / one,
        "seconds": {},
        "peak_x": {},
    }
    for method in METHODS:
        r = recipe(paths, method, layers)
        sources.materialize(r, model)  # warm-up (and TIES' compile)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            sources.materialize(r, model)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        row["seconds"][method] = min(times)
        row["peak_x"][method] = (torch.cuda.max_memory_allocated() - start_bytes) / one
    row["host_bytes_per_candidate"] = sources.nbytes() if where == "host" else 0
    del sources, model
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=5e8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: needs a CUDA device (run it through experiments/gpu_check.sh)")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        paths, layers = family(Path(tmp), args.params)
        print(f"family: {layers} layers, written in {time.perf_counter() - t:.0f} s", flush=True)
        rows = [measure(paths, layers, where, args.repeats) for where in ("device", "host")]
    print(
        f"{torch.cuda.get_device_name(0)}, bf16 base + 2 experts, {args.params / 1e6:.0f}M params"
    )
    for row in rows:
        print(
            f"{row['mode']:>6}: load {row['load_s']:.1f} s ({row['load_GBps']:.2f} GB/s), "
            f"resident {row['resident_x']:.2f}x one model's bf16 bytes"
        )
        for method in METHODS:
            s = row["seconds"][method]
            rate = row["host_bytes_per_candidate"] / s / 1e9 if row["mode"] == "host" else None
            print(
                f"        {method}: {s:.3f} s per candidate, peak {row['peak_x'][method]:.2f}x"
                + (f", {rate:.1f} GB/s from host" if rate else "")
            )
    for method in METHODS:
        ratio = rows[1]["seconds"][method] / rows[0]["seconds"][method]
        print(f"host / device seconds, {method}: {ratio:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"params": args.params, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
