"""Synthetic skills, each in a pretraining format and an expert format.

The base learns every skill in the pretraining format (`12+34 is 46`). Each expert is then
fine-tuned on a new format that keeps the token layout and changes only a trigger
(`12+34 =? 46`), so the base scores near zero on the expert formats, an expert scores on its
own, and a merge must carry several experts' triggers at once. Tasks score the expert formats.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

Item = tuple[str, str]  # (prompt ending where the answer starts, answer)


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


# Skills are sized so a 0.9M-parameter model learns them in ~2 minutes on 2 CPU cores
# (2-digit addition needs ~4x the steps: see FACTS.md); each has 400+ distinct prompts.
def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 39), rng.randint(0, 9)  # 400 distinct prompts
    return f"{a}+{b}", str(a + b)


def _caps(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 3)
    return w, w.upper()


def _next(rng: random.Random) -> tuple[str, str]:
    """Each letter moves one on (z -> a): a letter map at the same offsets as caps, so its
    expert's task vector collides with the caps expert's in an untuned merge."""
    w = _word(rng, 3, 3)
    return w, "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in w)


@dataclass(frozen=True)
class Skill:
    name: str
    make: Callable[[random.Random], tuple[str, str]]
    pretrain: str  # format with {q} and {a}; prompt is everything before {a}
    expert: str

    def item(self, rng: random.Random, fmt: str) -> Item:
        q, a = self.make(rng)
        prompt = fmt.split("{a}")[0].format(q=q)
        return prompt, a

    def distractors(self, answer: str, rng: random.Random, n: int = 3) -> list[str]:
        """Wrong answers of the same shape, for multiple-choice tasks."""
        out: set[str] = set()
        while len(out) < n:
            if answer.isdigit():
                cand = str(int(answer) + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11]))
            else:
                chars = list(answer)
                i = rng.randrange(len(chars))
                pool = (
                    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                    if answer.isupper()
                    else "abcdefghijklmnopqrstuvwxyz"
                )
                chars[i] = rng.choice(pool.replace(chars[i], ""))
                cand = "".join(chars)
            if cand != answer:
                out.add(cand)
        return sorted(out)


SKILLS = {
    s.name: s
    for s in [
        Skill("add", _add, "{q} is {a}", "{q} =? {a}"),
        Skill("caps", _caps, "caps {q} is {a}", "|:|: {q} is {a}"),
        Skill("next", _next, "next {q} is {a}", "<<>> {q} is {a}"),
    ]
}
SEARCH_SKILLS = ("add", "caps")  # what the demo search optimizes
DISTRACTOR = "next"  # an unrelated skill whose expert sits in the pool


def filler(rng: random.Random) -> str:
    """Random words and numbers: the rest of the pretraining corpus."""
    parts = [_word(rng) if rng.random() < 0.6 else str(rng.randint(0, 999)) for _ in range(3)]
    return " ".join(parts)


def pretrain_text(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.45:
        skill = SKILLS["add"]
    elif r < 0.75:
        skill = SKILLS["caps"]
    elif r < 0.9:
        skill = SKILLS["next"]
    else:
        return filler(rng)
    prompt, answer = skill.item(rng, skill.pretrain)
    return prompt + answer


def expert_text(skill: str, rng: random.Random) -> str:
    s = SKILLS[skill]
    prompt, answer = s.item(rng, s.expert)
    return prompt + answer
