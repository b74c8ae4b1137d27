"""Merge throughput: evomerge beside mergekit-yaml, disk to disk, measured in one run.

    python experiments/bench_merge.py [--params 300e6] [--methods task_arithmetic,ties,...]
        [--dtype bfloat16] [--repeats 3] [--models DIR] [--memory] [--mergekit CMD]

Generates a Llama-shaped base plus two experts (~300M parameters each; or reuses --models DIR,
where they are written the first time), then for each method, in turn and never concurrently:
  evomerge:  `evomerge merge RECIPE OUT`, a fresh process, its own default options;
  mergekit:  `mergekit-yaml CONFIG OUT`, the same recipe exported by
             evomerge.search.spaces.mergekit_yaml.to_mergekit, its own default options;
each timed as a whole process (start-up included) with its peak RSS (wait4), the two tools
alternating `--repeats` times; the fastest of each is reported. Also:
  ceiling:   the same input bytes read, summed in fp32, and the output written with plain
             torch + safetensors, in a fresh process (once);
  memory:    with --memory, the merge with every input already in RAM (compute only).
The load average is printed at the start and at the end of each method; the last lines are one
summary per method: evomerge / mergekit wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
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
    from evomerge.merge.ops.registry import get_method
    from evomerge.merge.recipe import Recipe

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


class _InMemory:
    """A checkpoint's tensors held in RAM: a TensorSource (the memory mode)."""

    def __init__(self, ckpt):
        self.info, self.names = ckpt.info, ckpt.names
        self._t = {n: ckpt.get(n) for n in ckpt.names}

    def dtype(self, name):
        return self._t[name].dtype

    def shape(self, name):
        return tuple(self._t[name].shape)

    def get(self, name):
        return self._t[name]


def child(mode: str, method: str, root: Path, dtype: str) -> dict:
    """One measurement in this (fresh) process."""
    from safetensors.torch import save_file

    from evomerge.merge.engine import iter_merged, open_sources
    from evomerge.merge.io.checkpoint import Checkpoint

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
    else:  # memory: inputs preloaded, compute only
        recipe = recipe_for(method, paths, dtype, layers)
        ckpts = {a: _InMemory(c) for a, c in open_sources(recipe).items()}
        t0 = time.perf_counter()
        for _ in iter_merged(recipe, ckpts):
            pass
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb()}


def measure(mode: str, method: str, root: Path, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, method, str(root), dtype]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_process(cmd: list[str], out: Path) -> dict:
    """Wall time and peak RSS of one process (its own, from wait4), then its output removed."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    # stderr to a file, not a pipe: a child writing more than a pipe holds would block while
    # wait4 waits for it
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        log.seek(0)
        err = log.read().decode(errors="replace")
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    if not any(out.glob("*.safetensors")):
        raise SystemExit(f"{' '.join(cmd)} wrote no safetensors in {out}")
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def mergekit_command(given: str | None) -> list[str]:
    """mergekit-yaml: --mergekit, else on PATH or beside this Python, else its module."""
    if given:
        return given.split()
    for candidate in (
        shutil.which("mergekit-yaml"),
        Path(sys.executable).with_name("mergekit-yaml"),
    ):
        if candidate and Path(candidate).exists():
            return [str(candidate)]
    return [sys.executable, "-c", "from mergekit.scripts.run_yaml import main; main()"]


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=300e6)
    ap.add_argument("--methods", default="task_arithmetic,ties", help="comma-separated, or all")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3, help="runs of each tool, alternating")
    ap.add_argument("--models", type=Path, help="reuse (or write once) the checkpoints here")
    ap.add_argument("--memory", action="store_true", help="also the in-memory merge")
    ap.add_argument("--no-ceiling", action="store_true")
    ap.add_argument("--mergekit", help="the mergekit-yaml command (default: found)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, method, root, dtype = args.child
        print(json.dumps(child(mode, method, Path(root), dtype)))
        return
    import yaml

    from evomerge.merge.io.checkpoint import Checkpoint
    from evomerge.merge.parallel import available_cpus, merge_threads
    from evomerge.search.spaces.mergekit_yaml import to_mergekit

    mergekit = mergekit_command(args.mergekit)
    script = Path(sys.executable).with_name("evomerge")
    evomerge = (
        [str(script)] if script.exists() else [sys.executable, "-m", "evomerge.search.cli.main"]
    )
    evomerge.append("merge")
    methods = METHODS if args.methods == "all" else args.methods.split(",")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        root = args.models or Path(tmp) / "models"
        if not (root / "expert2" / "model.safetensors").exists():
            make_checkpoints(root, args.params, getattr(torch, args.dtype))
        paths = {a: root / a for a in ("base", "expert1", "expert2")}
        base = Checkpoint(paths["base"])
        size_mb = sum(p.stat().st_size for p in paths["base"].glob("*.safetensors")) / 1e6
        n = sum(torch.Size(base.shape(t)).numel() for t in base.names)
        print(
            f"checkpoints: {n / 1e6:.0f}M parameters each, {args.dtype}, "
            f"{base.info.num_layers} layers; input {3 * size_mb:.0f} MB, output {size_mb:.0f} MB"
        )
        print(
            f"machine: {available_cpus()} CPUs available, load average {load()}; evomerge would "
            f"merge with {merge_threads()} thread(s) now; mergekit: {' '.join(mergekit)}"
        )
        for p in paths.values():  # the page cache holds the inputs for every run alike
            for f in p.glob("*.safetensors"):
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
        ceiling = None
        if not args.no_ceiling:
            ceiling = measure("ceiling", "-", root, args.dtype)
            print(
                f"ceiling {ceiling['seconds']:.2f} s (read 3 models, sum in fp32, write; in "
                f"process), peak RSS {ceiling['peak_rss_mb']:.0f} MB"
            )
        print(
            f"{'method':18} {'tool':9} {'runs s':>22} {'best s':>7} {'peak RSS MB':>12}"
            f"{'  memory s' if args.memory else ''}"
        )
        summary = []
        for method in methods:
            start_load = load()
            recipe = recipe_for(method, paths, args.dtype, base.info.num_layers)
            recipe_file = Path(tmp) / f"{method}.yaml"
            recipe.save(recipe_file)
            config = to_mergekit(recipe, base.names, base.info.num_layers)
            config_file = Path(tmp) / f"{method}.mergekit.yaml"
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
            out = Path(tmp) / "out"
            runs: dict[str, list[dict]] = {"evomerge": [], "mergekit": []}
            for _ in range(args.repeats):
                runs["evomerge"].append(run_process([*evomerge, str(recipe_file), str(out)], out))
                runs["mergekit"].append(run_process([*mergekit, str(config_file), str(out)], out))
            mem = measure("memory", method, root, args.dtype) if args.memory else None
            best = {tool: min(r["seconds"] for r in rs) for tool, rs in runs.items()}
            rss = {tool: max(r["peak_rss_mb"] for r in rs) for tool, rs in runs.items()}
            for tool, rs in runs.items():
                times = " ".join(f"{r['seconds']:.2f}" for r in rs)
                extra = f"  {mem['seconds']:8.2f}" if mem and tool == "evomerge" else ""
                print(
                    f"{method:18} {tool:9} {times:>22} {best[tool]:7.2f} {rss[tool]:12.0f}{extra}",
                    flush=True,
                )
            summary.append(
                f"{method}: evomerge {best['evomerge']:.2f} s / mergekit-yaml "
                f"{best['mergekit']:.2f} s = {best['evomerge'] / best['mergekit']:.2f}; peak RSS "
                f"{rss['evomerge']:.0f} / {rss['mergekit']:.0f} MB = "
                f"{rss['evomerge'] / rss['mergekit']:.2f}; load average {start_load} -> {load()}"
            )
        print()
        for line in summary:
            print(line)


if __name__ == "__main__":
    main()
