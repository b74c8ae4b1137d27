"""Merge throughput against a bandwidth ceiling measured in the same run.

    python experiments/bench_merge.py [--params 300e6] [--methods linear,ties,...] [--dtype bfloat16]

Generates a Llama-shaped base plus two experts (~300M parameters each), then for each method:
  in-memory: all inputs already in RAM, merged tensor by tensor (compute only);
  disk:      `evomerge merge` end to end (read, merge, write shards), in a fresh process,
             with its peak RSS;
  ceiling:   the same input bytes read, summed in fp32, and the same output bytes written with
             plain torch + safetensors, in a fresh process.
Ratios are ceiling time / method time (1.0 = as fast as moving and summing the bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = [
    "linear",
    "slerp",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]


def make_checkpoints(root: Path, params: float, dtype: torch.dtype) -> dict[str, Path]:
    """Random Llama-shaped checkpoints written tensor by tensor (no model is instantiated)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden, inter, vocab = 1024, 2816, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=vocab,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],  # mergekit reads the architecture from here
    )
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    paths = {}
    g = torch.Generator().manual_seed(0)
    for alias in ("base", "expert1", "expert2"):
        out = root / alias
        out.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(out)
        state = {n: (0.02 * torch.randn(s, generator=g)).to(dtype) for n, s in shapes.items()}
        save_file(state, out / "model.safetensors")
        paths[alias] = out
        del state
    n = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"checkpoints: {n / 1e6:.0f}M parameters each, {dtype}, {layers} layers")
    return paths


def recipe_for(method: str, paths: dict[str, Path], dtype: str, layers: int):
    """The benchmark's recipe: two experts at weights 0.6 / 0.4 and density 0.5 (for the
    methods that declare those parameters), slerp at t 0.4, linear over all three models."""
    from evomerge.merge.recipe import Recipe
    from evomerge.merge.registry import get_method

    declared = {p.name for p in get_method(method).model_params}
    if method == "slerp":
        params: dict = {"expert1": {}}
    elif method == "linear":
        params = {a: {"weight": 1 / 3} for a in paths}
    else:
        given = {
            "expert1": {"weight": 0.6, "density": 0.5},
            "expert2": {"weight": 0.4, "density": 0.5},
        }
        params = {a: {k: v for k, v in p.items() if k in declared} for a, p in given.items()}
    ps: dict = {
        "method": method,
        "base": "base",
        "groups": [{"layers": [0, layers], "params": params}],
    }
    if method == "slerp":
        ps["groups"][0]["t"] = 0.4
    if get_method(method).random:
        ps["seed"] = 1
    return Recipe.parse(
        {
            "dtype": dtype,
            "models": {a: {"path": str(p)} for a, p in paths.items()},
            "parameter_space": ps,
        }
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, method: str, root: Path, dtype: str) -> dict:
    """One measurement in this (fresh) process."""
    from safetensors.torch import save_file

    from evomerge.merge.checkpoint import Checkpoint
    from evomerge.merge.engine import iter_merged, merge_to_dir, open_sources

    paths = {a: root / a for a in ("base", "expert1", "expert2")}
    layers = Checkpoint(paths["base"]).info.num_layers
    out = root / f"out-{method}-{mode}"
    if mode == "ceiling":
        ckpts = {a: Checkpoint(p) for a, p in paths.items()}
        t0 = time.perf_counter()
        result = {}
        for name in ckpts["base"].names:
            acc = ckpts["base"].get(name).float()
            for a in ("expert1", "expert2"):
                acc += ckpts[a].get(name).float()
            result[name] = acc.to(getattr(torch, dtype))
        save_file(result, out.with_suffix(".safetensors"))
        seconds = time.perf_counter() - t0
        os.unlink(out.with_suffix(".safetensors"))
    elif mode == "disk":
        recipe = recipe_for(method, paths, dtype, layers)
        t0 = time.perf_counter()
        merge_to_dir(recipe, out, max_shard_size="1GB", force=True)
        seconds = time.perf_counter() - t0
        subprocess.run(["rm", "-rf", str(out)], check=True)
    else:  # memory: inputs preloaded, compute only
        recipe = recipe_for(method, paths, dtype, layers)
        ckpts = open_sources(recipe)
        cache = {a: {n: c.get(n) for n in c.names} for a, c in ckpts.items()}
        for a, c in ckpts.items():
            c.get = cache[a].__getitem__  # type: ignore[method-assign]
        t0 = time.perf_counter()
        for _ in iter_merged(recipe, ckpts):
            pass
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def measure(mode: str, method: str, root: Path, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, method, str(root), dtype]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=300e6)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.child:
        mode, method, root, dtype = args.child
        print(json.dumps(child(mode, method, Path(root), dtype)))
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        paths = make_checkpoints(root, args.params, getattr(torch, args.dtype))
        size_mb = sum(p.stat().st_size for p in (root / "base").glob("*.safetensors")) / 1e6
        ceiling = measure("ceiling", "-", root, args.dtype)
        print(
            f"input {3 * size_mb:.0f} MB, output {size_mb:.0f} MB; ceiling "
            f"{ceiling['seconds']:.2f} s (read 3 models, sum in fp32, write), "
            f"peak RSS {ceiling['peak_rss_mb']:.0f} MB"
        )
        print(
            f"{'method':18} {'memory s':>9} {'ratio':>6} {'disk s':>8} {'ratio':>6} {'peak RSS MB':>12}"
        )
        for method in args.methods.split(","):
            mem = measure("memory", method, root, args.dtype)
            disk = measure("disk", method, root, args.dtype)
            print(
                f"{method:18} {mem['seconds']:9.2f} {ceiling['seconds'] / mem['seconds']:6.2f} "
                f"{disk['seconds']:8.2f} {ceiling['seconds'] / disk['seconds']:6.2f} "
                f"{disk['peak_rss_mb']:12.0f}",
                flush=True,
            )
        del paths


if __name__ == "__main__":
    main()
