"""A small, deterministic causal-LM training loop for the zoo (CPU, minutes)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from evomerge.fitness.zoo.tokenizer import BOS, CHARS, EOS, PAD, SPECIALS

_IDS = {c: i for i, c in enumerate(SPECIALS + list(CHARS))}


def encode_batch(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """<bos> text <eos>, right-padded: (input_ids, attention_mask, labels with pads at -100)."""
    seqs = [[BOS, *(_IDS[c] for c in t), EOS] for t in texts]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def train(
    model: torch.nn.Module,
    sample: Callable[[random.Random], str],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup: float = 0.1,
) -> float:
    """AdamW with linear warm-up and cosine decay to 10 %; returns the mean loss of the last 10 %."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, int(warmup * steps))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    tail: list[float] = []
    for step in range(steps):
        ids, mask, labels = encode_batch([sample(rng) for _ in range(batch_size)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step >= steps - max(1, steps // 10):
            tail.append(float(loss.detach()))
    model.eval()
    return sum(tail) / len(tail)


@torch.no_grad()
def greedy_accuracy(model, items: list[tuple[str, str]], batch_size: int = 128) -> float:
    """Exact match of greedy answers (a quick check during the build; the table uses lm-eval)."""
    correct = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        seqs = [[BOS, *(_IDS[c] for c in p)] for p, _ in chunk]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), PAD)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):  # left padding
            ids[j, width - len(s) :] = torch.tensor(s)
            mask[j, width - len(s) :] = 1
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
        for j, (_, answer) in enumerate(chunk):
            gen = out[j, width:].tolist()
            gen = gen[: gen.index(EOS)] if EOS in gen else gen
            text = "".join((SPECIALS + list(CHARS))[t] for t in gen if t >= len(SPECIALS))
            correct += text == answer
    return correct / len(items)
