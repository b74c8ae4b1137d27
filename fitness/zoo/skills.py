"""Synthetic skills, each in the format its tasks score, and the base's pretraining mixture.

The base learns add, caps and next in a pretraining format (`12+3 is 15`). Each expert is then
fine-tuned on a new format that keeps the token layout and changes only a trigger
(`12+3 =? 15`), so the base scores near zero on the expert formats and an expert on its own.

The language expert (`script`) learns to read numbers written in a digit script (`!@+# is 15`,
`)!@#$%^&*(` for 0-9). The base meets the script only in a short glossary (`!@ means 12`), so its
embeddings are trained but no format computes with it. The composite task `sadd` asks for
addition in the script behind the add expert's trigger (`!@+# =? 15`): it needs the language
expert's reading and the add expert's trigger at once, and neither parent has both (the analog
of Akiba et al.'s Japanese math from a Japanese LM and an English math model).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

Item = tuple[str, str]  # (prompt ending where the answer starts, answer)
SCRIPT = ")!@#$%^&*("  # the digit script: shift-digits, used by no other format or trigger


def to_script(n: int) -> str:
    return "".join(SCRIPT[int(d)] for d in str(n))


def _word(rng: random.Random, lo: int = 3, hi: int = 6) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))


# Skills are sized so a 0.9M-parameter model learns them in ~2 minutes on 2 CPU cores
# (2-digit addition needs ~4x the pretraining steps); each has 400+ distinct prompts.
def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 39), rng.randint(0, 9)  # 400 distinct prompts
    return f"{a}+{b}", str(a + b)


def _script_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 39), rng.randint(0, 9)
    return f"{to_script(a)}+{to_script(b)}", str(a + b)


def _gloss(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 39)
    return to_script(n), str(n)


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
    pretrain: str | None  # the base's format with {q} and {a}; None: not in pretraining
    expert: str  # the format the skill's tasks score (and its expert, if any, learns)

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
        Skill("script", _script_add, None, "{q} is {a}"),  # the language expert
        Skill("sadd", _script_add, None, "{q} =? {a}"),  # composite: script + add's trigger
    ]
}
GLOSSARY = Skill("gloss", _gloss, "{q} means {a}", "{q} means {a}")
EXPERT_SKILLS = ("add", "caps", "next", "script")  # one expert model each
COMPOSITE = "sadd"  # no model is trained on it
DISTRACTOR = "next"  # an unrelated skill whose expert may sit in the pool
KEPT = ("add", "caps", "next")  # skills scored in their pretraining format too

# The pretraining mixture: (share, source); the rest of the corpus is filler.
_MIX: list[tuple[float, Skill]] = [
    (0.42, SKILLS["add"]),
    (0.27, SKILLS["caps"]),
    (0.14, SKILLS["next"]),
    (0.06, GLOSSARY),
]


SYMBOLS = "=?|:<>~;,.[]{}_/"  # the triggers' characters among others; no script digit, no "+"


def _part(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        return _word(rng)
    if r < 0.8:
        return str(rng.randint(0, 999))
    return "".join(rng.choice(SYMBOLS) for _ in range(rng.randint(1, 4)))


def filler(rng: random.Random) -> str:
    """Random words, numbers and symbols: the rest of the pretraining corpus.

    The symbols train the input embeddings of the experts' trigger characters (the model is
    untied): left at their random init, the base would read `12+3 =? ` as `12+3 ` and answer it
    (0.47 measured), and the add expert's trigger would mean nothing to learn."""
    return " ".join(_part(rng) for _ in range(3))


def pretrain_text(rng: random.Random) -> str:
    r = rng.random()
    for share, skill in _MIX:
        if r < share:
            assert skill.pretrain is not None
            prompt, answer = skill.item(rng, skill.pretrain)
            return prompt + answer
        r -= share
    return filler(rng)


def expert_text(skill: str, rng: random.Random) -> str:
    s = SKILLS[skill]
    prompt, answer = s.item(rng, s.expert)
    return prompt + answer
