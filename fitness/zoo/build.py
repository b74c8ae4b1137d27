"""`evomerge zoo build`: the offline model zoo, deterministic from a seed, cached by its parameters.

Layout of a zoo directory:
    llama/{base,add,caps,next,script,joint}   Llama family (untied embeddings): base, skill
                                   experts, distractor, language expert, joint reference
    qwen2/{base,add,caps}             a second, smaller family (tied) for architecture coverage
    data/<skill>_<search|heldout>.jsonl   the skill's scored format (expert formats, composite)
    data/<skill>_pre_<search|heldout>.jsonl   the base's pretraining format (kept skills)
    tasks/*.yaml (rendered), zoo.json (parameters)

Every fine-tune (experts, distractor, joint reference) draws a share `replay` of its batches from
the pretraining text: without it each expert forgets the base's other skills, and a task vector
becomes "learn my trigger + erase the rest", which no merge can add up
(zoo v1's experts, fine-tuned without replay, kept 0.31-0.60 of the base's 0.99-1.00 on the
pretraining formats; experiments/README.md, Zoo v2).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from evomerge.fitness.tasks import render_zoo_tasks
from evomerge.fitness.zoo import skills as sk
from evomerge.fitness.zoo.tokenizer import BOS, CHARS, EOS, PAD, SPECIALS, build_tokenizer
from evomerge.fitness.zoo.train import greedy_accuracy, train
from evomerge.merge.errors import EvomergeError

ZOO_VERSION = 2
EXPERTS = sk.EXPERT_SKILLS  # one Llama expert per skill; the joint reference learns all


@dataclass(frozen=True)
class ZooSize:
    hidden: int
    layers: int
    pretrain_steps: int
    pretrain_batch: int
    expert_steps: int
    joint_steps: int
    second_hidden: int
    second_layers: int
    second_steps: int
    items: int  # task items per skill and split
    pretrain_lr: float = 3e-3
    expert_lr: float = 1e-4
    distractor_lr: float = 3e-4  # a stronger task vector: it interferes in untuned merges
    # the language expert: at 1e-4 it reads the script at 0.14, at 1e-3 at 0.91 while keeping
    # the base's skills (replay); a stronger vector, which the search must weigh
    script_lr: float = 1e-3
    expert_batch: int = 64
    replay: float = 0.5  # share of every fine-tuning batch drawn from the pretraining text


SIZES = {
    # tests: seconds; the skills are not learned, only the machinery is exercised
    "tiny": ZooSize(
        hidden=32,
        layers=2,
        pretrain_steps=30,
        pretrain_batch=32,
        expert_steps=10,
        joint_steps=10,
        second_hidden=32,
        second_layers=2,
        second_steps=10,
        items=40,
    ),
    # the demo: real skills in a few minutes on 2 CPU cores
    "demo": ZooSize(
        hidden=128,
        layers=4,
        pretrain_steps=800,
        pretrain_batch=64,
        expert_steps=200,
        joint_steps=300,
        second_hidden=64,
        second_layers=2,
        second_steps=200,
        items=150,
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge")) / "zoo"


def zoo_key(size: str, seed: int) -> str:
    params = json.dumps(
        {"v": ZOO_VERSION, "size": asdict(SIZES[size]), "seed": seed}, sort_keys=True
    )
    return f"v{ZOO_VERSION}-{size}-seed{seed}-{hashlib.sha256(params.encode()).hexdigest()[:8]}"


def default_zoo_dir(size: str = "demo", seed: int = 0) -> Path:
    return cache_root() / zoo_key(size, seed)


def is_built(path: Path, size: str, seed: int) -> bool:
    meta = path / "zoo.json"
    return meta.is_file() and json.loads(meta.read_text()).get("key") == zoo_key(size, seed)


def _config(family: str, hidden: int, layers: int, tie: bool):
    from transformers import AutoConfig

    common = dict(
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
    return AutoConfig.for_model(family, **common)


def _save(model, tokenizer, path: Path) -> None:
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def task_sources() -> dict[str, tuple[sk.Skill, str]]:
    """Data file stem -> (skill, format): every skill's scored format, and the pretraining
    format of the skills the base learned (`<skill>_pre`: what a fine-tune kept of them)."""
    out = {name: (skill, skill.expert) for name, skill in sk.SKILLS.items()}
    for name in sk.KEPT:
        pretrain = sk.SKILLS[name].pretrain
        assert pretrain is not None
        out[f"{name}_pre"] = (sk.SKILLS[name], pretrain)
    return out


def write_task_data(root: Path, items: int, seed: int) -> None:
    """Disjoint search / held-out items per task source."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    for stem, (skill, fmt) in task_sources().items():
        rng = random.Random(f"{seed}/data/{stem}")
        seen: set[str] = set()
        rows: list[dict] = []
        for _ in range(1000 * items):
            if len(rows) == 2 * items:
                break
            prompt, answer = skill.item(rng, fmt)
            if prompt in seen:
                continue
            seen.add(prompt)
            choices = [answer, *skill.distractors(answer, rng)]
            rng.shuffle(choices)
            rows.append(
                {
                    "prompt": prompt,
                    "answer": answer,
                    "choices": choices,
                    "label": choices.index(answer),
                }
            )
        if len(rows) < 2 * items:
            raise ValueError(f"{stem} has fewer than {2 * items} distinct items")
        for split, part in (("search", rows[:items]), ("heldout", rows[items:])):
            with open(root / "data" / f"{stem}_{split}.jsonl", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in part)


def replayed(skills: list[str], replay: float):
    """A sampler of expert-format items, a share `replay` of them pretraining text instead."""

    def sample(rng: random.Random) -> str:
        if rng.random() < replay:
            return sk.pretrain_text(rng)
        return sk.expert_text(rng.choice(skills), rng)

    return sample


def _lr(size: ZooSize, name: str) -> float:
    return {sk.DISTRACTOR: size.distractor_lr, "script": size.script_lr}.get(name, size.expert_lr)


def _family(
    root: Path,
    family: str,
    hidden: int,
    layers: int,
    pre_steps: int,
    size: ZooSize,
    seed: int,
    experts: tuple[str, ...],
    joint: bool,
    tie: bool,
    log,
) -> None:
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(_config(family, hidden, layers, tie))
    t0 = time.perf_counter()
    loss = train(base, sk.pretrain_text, pre_steps, size.pretrain_batch, size.pretrain_lr, seed)
    log(
        f"{family}/base: pretrained {pre_steps} steps in {time.perf_counter() - t0:.0f} s "
        f"(loss {loss:.3f})"
    )
    _save(base, tok, root / family / "base")
    jobs = [(e, [e]) for e in experts] + ([("joint", list(EXPERTS))] if joint else [])
    for name, skill_names in jobs:
        model = copy.deepcopy(base)
        steps = size.joint_steps if name == "joint" else size.expert_steps
        t0 = time.perf_counter()
        loss = train(
            model,
            replayed(skill_names, size.replay),
            steps,
            size.expert_batch,
            _lr(size, name),
            seed + 1 + len(name),
        )
        rng = random.Random(1)
        quick = {
            s: greedy_accuracy(
                model, [sk.SKILLS[s].item(rng, sk.SKILLS[s].expert) for _ in range(50)]
            )
            for s in skill_names
        }
        log(
            f"{family}/{name}: fine-tuned {steps} steps in {time.perf_counter() - t0:.0f} s "
            f"(loss {loss:.3f}, quick greedy check {quick})"
        )
        _save(model, tok, root / family / name)


def build_zoo(
    out: Path | None = None, size: str = "demo", seed: int = 0, log=print, force: bool = False
) -> Path:
    """Build (or reuse) a zoo; returns its directory. Built in a temporary sibling, then renamed."""
    if size not in SIZES:
        raise EvomergeError(f"--size {size!r}: choose one of {', '.join(SIZES)}")
    out = Path(out) if out else default_zoo_dir(size, seed)
    if is_built(out, size, seed) and not force:
        log(f"zoo {out} is built (parameters match): reusing it")
        render_zoo_tasks(out)  # the task YAMLs follow the repository's
        return out
    if out.exists() and not force and any(out.iterdir()):
        raise EvomergeError(
            f"{out}: exists but is not a zoo with these parameters; "
            "choose another --out or pass --force"
        )
    torch.set_num_threads(min(os.cpu_count() or 1, 8))
    cfg = SIZES[size]
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        write_task_data(tmp, cfg.items, seed)
        # Llama untied, so the embeddings and the head are separate genes that both act;
        # Qwen2 tied, so both conventions stay covered.
        _family(
            tmp,
            "llama",
            cfg.hidden,
            cfg.layers,
            cfg.pretrain_steps,
            cfg,
            seed,
            EXPERTS,
            True,
            False,
            log,
        )
        _family(
            tmp,
            "qwen2",
            cfg.second_hidden,
            cfg.second_layers,
            cfg.second_steps,
            cfg,
            seed,
            ("add", "caps"),
            False,
            True,
            log,
        )
        meta = {
            "key": zoo_key(size, seed),
            "size": size,
            "seed": seed,
            "params": asdict(cfg),
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        (tmp / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    render_zoo_tasks(out)  # absolute paths: rendered where the zoo finally lives
    log(f"zoo built in {time.perf_counter() - start:.0f} s at {out}")
    return out
