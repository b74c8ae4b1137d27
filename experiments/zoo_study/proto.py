"""Prototype a zoo design: pretrain a base, fine-tune experts with replay, greedy-score formats.

    python experiments/zoo_study/proto.py --tag T [--pre-steps 800] [--replay 0.5] ...

Prints each model's greedy exact match on every format (expert formats, the composite, the
pretraining formats) and task-arithmetic merges. Models are cached under /tmp/zs/<tag>/.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from pathlib import Path

import torch

from evomerge.fitness.zoo import skills as sk
from evomerge.fitness.zoo.tokenizer import BOS, CHARS, EOS, PAD, SPECIALS
from evomerge.fitness.zoo.train import greedy_accuracy, train

FORMATS = {f"{s}": (sk.SKILLS[s], sk.SKILLS[s].expert) for s in sk.SKILLS}
FORMATS |= {f"{s}.pre": (sk.SKILLS[s], sk.SKILLS[s].pretrain) for s in sk.KEPT}
FORMATS["gloss"] = (sk.GLOSSARY, sk.GLOSSARY.pretrain)


def items(name: str, n: int = 150) -> list[tuple[str, str]]:
    skill, fmt = FORMATS[name]
    rng = random.Random(f"eval/{name}")
    return [skill.item(rng, fmt) for _ in range(n)]


EVAL = {name: items(name) for name in FORMATS}


def scores(model) -> dict[str, float]:
    return {k: greedy_accuracy(model, v) for k, v in EVAL.items()}


def make_model(hidden: int, layers: int, tie: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(SPECIALS) + len(CHARS),
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return AutoModelForCausalLM.from_config(cfg)


def replayed(skills: list[str], replay: float):
    def sample(rng: random.Random) -> str:
        if rng.random() < replay:
            return sk.pretrain_text(rng)
        return sk.expert_text(rng.choice(skills), rng)

    return sample


def fmt_row(label: str, s: dict[str, float]) -> str:
    return f"{label:28s} " + " ".join(f"{s[k]:5.2f}" for k in FORMATS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", required=True)
    ap.add_argument("--pre-steps", type=int, default=800)
    ap.add_argument("--pre-batch", type=int, default=64)
    ap.add_argument("--pre-lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--replay", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--script-lr", type=float, default=None)
    ap.add_argument("--script-steps", type=int, default=None)
    ap.add_argument("--script-replay", type=float, default=None)
    ap.add_argument("--script-embed-lr", type=float, default=None)
    ap.add_argument("--tie-pretrain", action="store_true", help="pretrain tied, then untie")
    ap.add_argument("--experts", default="add,caps,script,next")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path("/tmp/zs") / args.tag
    root.mkdir(parents=True, exist_ok=True)
    print(f"load {os.getloadavg()}  args {vars(args)}", flush=True)
    print(f"{'model':28s} " + " ".join(f"{k[:5]:>5s}" for k in FORMATS), flush=True)
    torch.manual_seed(args.seed)
    base = make_model(args.hidden, args.layers, args.tie)
    if (root / "base.pt").exists():
        base.load_state_dict(torch.load(root / "base.pt"))
    else:
        t0 = time.perf_counter()
        pre = make_model(args.hidden, args.layers, True) if args.tie_pretrain else base
        loss = train(pre, sk.pretrain_text, args.pre_steps, args.pre_batch, args.pre_lr, args.seed)
        if pre is not base:
            sd = {k: v.clone() for k, v in pre.state_dict().items()}
            base.load_state_dict(sd)
        print(f"base pretrained in {time.perf_counter() - t0:.0f} s, loss {loss:.3f}", flush=True)
        torch.save(base.state_dict(), root / "base.pt")
    base.eval()
    results = {"base": scores(base)}
    print(fmt_row("base", results["base"]), flush=True)
    models = {}
    for e in args.experts.split(","):
        m = copy.deepcopy(base)
        lr = args.script_lr if e == "script" and args.script_lr else args.lr
        steps = args.script_steps if e == "script" and args.script_steps else args.steps
        replay = (
            args.script_replay if e == "script" and args.script_replay is not None else args.replay
        )
        elr = args.script_embed_lr if e == "script" else None
        cached = root / (f"{e}-lr{lr}-s{steps}-r{replay}" + (f"-e{elr}" if elr else "") + ".pt")
        t0 = time.perf_counter()
        if cached.exists():
            m.load_state_dict(torch.load(cached))
        else:
            # --script-embed-lr ran with an `embed_lr` option of train() (the input embeddings'
            # own lr), since removed: it measured 0.31 (untied base) and was not kept
            kw = {"embed_lr": elr} if elr else {}
            train(m, replayed([e], replay), steps, 64, lr, args.seed + 1 + len(e), **kw)
            torch.save(m.state_dict(), cached)
        m.eval()
        results[e] = scores(m)
        models[e] = m
        print(fmt_row(f"{e} ({time.perf_counter() - t0:.0f}s)", results[e]), flush=True)
    b = base.state_dict()
    taus = {e: {k: m.state_dict()[k] - b[k] for k in b} for e, m in models.items()}
    probe = copy.deepcopy(base)

    def merged(lams: dict[str, float], parts: dict[str, str] | None = None):
        """base + sum lam_e tau_e; parts: tensor-name filter per expert (embed/layers/head)."""
        sd = {}
        for k, v in b.items():
            out = v.clone()
            for e, lam in lams.items():
                if parts and e in parts and where(k) not in parts[e]:
                    continue
                out += lam * taus[e][k]
            sd[k] = out
        probe.load_state_dict(sd)
        return probe

    if "caps" in models and "next" in models:
        for lc, ln in ((1.0, 1.0), (0.7, 0.7), (1.0, 0.5), (0.5, 1.0)):
            label = f"TA caps {lc} + next {ln}"
            results[label] = scores(merged({"caps": lc, "next": ln}))
            print(fmt_row(label, results[label]), flush=True)
        for lam in (0.5, 0.7, 1.0):
            label = f"TA {lam} add+caps+next"
            results[label] = scores(merged({"add": lam, "caps": lam, "next": lam}))
            print(fmt_row(label, results[label]), flush=True)
    pool = [e for e in models if e != "next"]
    for lam in (0.5, 0.7, 1.0):
        label = f"TA {lam} {'+'.join(pool)}"
        results[label] = scores(merged({e: lam for e in pool}))
        print(fmt_row(label, results[label]), flush=True)
    if "script" in models and "add" in models:
        for la, ls in ((1.0, 1.0), (1.0, 0.5), (0.5, 1.0), (1.0, 1.5), (1.5, 1.0)):
            label = f"TA add {la} + script {ls}"
            results[label] = scores(merged({"add": la, "script": ls}))
            print(fmt_row(label, results[label]), flush=True)
        label = "add + script[embed]"
        results[label] = scores(merged({"add": 1.0, "script": 1.0}, {"script": "embed"}))
        print(fmt_row(label, results[label]), flush=True)
    # where each task vector's norm lives
    for e, t in taus.items():
        parts: dict[str, float] = {}
        for k, v in t.items():
            parts[where(k)] = parts.get(where(k), 0.0) + float(v.norm() ** 2)
        total = sum(parts.values())
        print(
            f"tau[{e}] norm share: "
            + ", ".join(f"{p} {x / total:.2f}" for p, x in parts.items())
            + f"; |tau|/|base| {total**0.5 / sum(float(v.norm() ** 2) for v in b.values()) ** 0.5:.3f}"
        )
    (root / "results.json").write_text(json.dumps(results, indent=1))
    print(f"load {os.getloadavg()}", flush=True)


def where(name: str) -> str:
    if "embed_tokens" in name:
        return "embed"
    if "layers." in name:
        return "layers"
    return "head"  # lm_head and the final norm


if __name__ == "__main__":
    main()
