"""The journal, `trials.jsonl`: its lines, recipes journaled compactly, and a reader that follows
the file as it grows (parsing each line once per process).

Every line is one JSON object: a trial's state change (`generation`, `index`, `status`, ...) or
an annotation of a trial (no `status`: its final rescoring). A trial's `recipe` (ASKED records)
is journaled in one of four forms; readers rebuild the first from each:

  the recipe                    as `Recipe.model_dump(mode="json")` gives it (runs started
                                before compact journals write only this form)
  the recipe, "models": "pinned"  its models are exactly run.yaml's pinned references, in order
  {"template": N, "recipe": R, "from_x": [j | null, ...]}
                                the recipe R (either form above), which also defines template N:
                                R's structure with a slot for each number in it, and where each
                                slot's number comes from: the trial's genome `x[j]`, or (null)
                                R's own number
  {"template": N, "set": {"k": v, ...}}
                                template N filled in for this trial: slot k is v where listed,
                                else from the trial's own `x` or the template's number

A parameter-space recipe's numbers are mostly its genome's values (clipped to their ranges), so
a trial's recipe costs its seed and the clipped values, not a copy of 30 groups' structure, model
paths and parameters: the journal of a 10,000-trial search is a third of the size, and parsing
it (what `status`, `report` and a resume pay) a fifth of the time. The writer checks that the
compact form rebuilds the recipe exactly (the same JSON text, so the same bits when merged) and
journals the recipe whole where it would not, or where MAX_TEMPLATES structures exist already
(data-flow paths vary in length).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from evomerge.search.trial import Status, TrialRecord

PINNED = "pinned"  # a recipe's "models" when they are run.yaml's pinned references
MAX_TEMPLATES = 16  # recipe structures per journal; more are journaled whole
_END = 64  # bytes at the start and before the read offset kept, to notice a rewrite in place

Bad = tuple[int, str, bytes]  # (line number, why, the raw line)
STATUSES = frozenset(s.value for s in Status)  # once: an Enum's values cost 20 us per line


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic collector off while a journal's records are built: they hold no cycles, and
    its passes over the growing heap were a third of reading a 10,000-trial journal."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# the start of a line as the driver writes ASKED ones (and undecodable FAILED ones): `x` next
_X_AT = re.compile(rb'\{"generation":\d+,"index":\d+,"status":"[A-Z]+","x":\[')
_IN_X = b"0123456789.-+eE,"  # what a list of finite JSON numbers is made of, brackets aside


def _lazy_x(line: bytes) -> dict | None:
    """The line's object with `x` left as its JSON text (bytes), or None where the line is not
    in the driver's form: 120 floats parsed per ASKED line were 70 % of reading a journal, and
    status and report never read them. Only a flat list of finite numbers is cut out (the
    first `]` ends it); the rest of the line is parsed as JSON, so a line cut short is not
    JSON here either. Damage inside `x` itself that keeps to those characters is found when
    `x` is read."""
    m = _X_AT.match(line)
    if m is None:
        return None
    start = m.end() - 1
    end = line.find(b"]", start) + 1
    if end == 0 or line[start + 1 : end - 1].translate(None, _IN_X):
        return None
    record = json.loads(line[:start] + b"0" + line[end:])
    record["x"] = line[start:end]  # the key keeps its place: the placeholder's
    return record


def parse_record(line: bytes, lazy_x: bool = False) -> tuple[dict | None, str | None]:
    """(record, None) for a valid journal line, else (None, why). `lazy_x`: `x` may be left as
    its JSON text (bytes; `TrialRecord.x` parses it)."""
    try:
        record = (_lazy_x(line) if lazy_x else None) or json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "not JSON"
    if not isinstance(record, dict):
        return None, "not a record (a JSON object)"
    g, i, status = record.get("generation"), record.get("index"), record.get("status")
    if not (type(g) is int and type(i) is int and g >= 1 and i >= 0):
        return None, "no valid generation and index"
    # a record changes a trial's status, or (without one) annotates it: its final rescoring
    if status not in STATUSES and not (status is None and "rescored" in record):
        return None, f"unknown status {status!r}"
    return record, None


def line(record: dict | TrialRecord) -> bytes:
    data = record.to_json() if isinstance(record, TrialRecord) else record
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


# -- templates ------------------------------------------------------------------------------
class _Slot:
    """Where a number was, in a template's structure."""

    def __repr__(self) -> str:
        return "<slot>"


SLOT = _Slot()


def _is_number(v: object) -> bool:
    return type(v) is int or type(v) is float  # not bool, whose type is a subclass of int


def _strip(value: object, numbers: list) -> object:
    """`value` with each number replaced by SLOT, the numbers appended to `numbers` in order."""
    if isinstance(value, dict):
        return {k: _strip(v, numbers) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip(v, numbers) for v in value]
    if _is_number(value):
        numbers.append(value)
        return SLOT
    return value


def _fill(skeleton: object, numbers: Iterator) -> object:
    """The structure again, new containers throughout, each SLOT the next number."""
    if isinstance(skeleton, dict):
        return {k: _fill(v, numbers) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_fill(v, numbers) for v in skeleton]
    if skeleton is SLOT:
        return next(numbers)
    return skeleton


def _builder(skeleton: object) -> Callable[[list], object]:
    """A function of a template's numbers that builds its structure: the structure as one
    Python display (`{c[0]: v[0], c[1]: [v[1], c[2]]}`), compiled once, builds a recipe in a
    tenth of the time a walk takes. The code holds only indexes: every key, string and
    constant of the journal reaches it as a value of `c`, never as code."""
    consts: list = []
    slots = iter(range(1 << 62))

    def display(node: object, depth: int) -> str:
        if depth > 50:
            raise RecursionError  # deeper than any recipe: the walk builds it
        if isinstance(node, dict):
            items = []
            for k, v in node.items():
                consts.append(k)
                items.append(f"c[{len(consts) - 1}]:{display(v, depth + 1)}")
            return "{" + ",".join(items) + "}"
        if isinstance(node, list):
            return "[" + ",".join(display(v, depth + 1) for v in node) + "]"
        if node is SLOT:
            return f"v[{next(slots)}]"
        consts.append(node)
        return f"c[{len(consts) - 1}]"

    try:
        code = compile("lambda v: " + display(skeleton, 0), "<recipe template>", "eval")
        return eval(code, {"__builtins__": {}, "c": consts})  # noqa: S307 - indexes only
    except (RecursionError, SyntaxError, MemoryError, ValueError):
        return lambda v: _fill(skeleton, iter(v))


def _key(skeleton: object) -> str:
    # a structure's identity; a collision would only cost compactness: every packed recipe is
    # checked to rebuild exactly
    return json.dumps(skeleton, separators=(",", ":"), default=lambda _: "\0")


def _same(a: object, b: object) -> bool:
    """The same JSON number: type, value and (for 0.0) sign."""
    if type(a) is not type(b) or a != b:
        return False
    if isinstance(a, float) and isinstance(b, float):
        return math.copysign(1.0, a) == math.copysign(1.0, b)
    return True


class Template:
    def __init__(self, number: int, recipe: dict, from_x: list[int | None]):
        self.number = number
        self.consts: list = []
        self.skeleton = _strip(recipe, self.consts)
        self.from_x = from_x
        self.key = _key(self.skeleton)
        self.reach = max((j for j in from_x if j is not None), default=-1)  # x's length - 1
        self._build: Callable[[list], object] | None = None

    def build(self, numbers: list) -> dict:
        if self._build is None:
            self._build = _builder(self.skeleton)
        return self._build(numbers)  # type: ignore[return-value]

    def numbers(self, x: list, given: Mapping[int, object]) -> list:
        values = [c if j is None else x[j] for j, c in zip(self.from_x, self.consts, strict=True)]
        for k, v in given.items():
            values[k] = v
        return values


class Packed:
    """A recipe as journaled compactly; `build()` is the recipe (a new dict on every call)."""

    __slots__ = ("given", "pinned", "recipe", "template", "x")

    def __init__(
        self,
        pinned: dict[str, str] | None,
        recipe: dict | None = None,
        template: Template | None = None,
        x: list | bytes | None = None,  # the trial's genome, or its JSON text
        given: Mapping[int, object] | None = None,
    ):
        self.pinned, self.recipe, self.template, self.x = pinned, recipe, template, x
        self.given = given or {}

    def build(self) -> dict:
        if self.template is not None:
            x: list = json.loads(self.x) if isinstance(self.x, bytes) else (self.x or [])
            recipe = self.template.build(self.template.numbers(x, self.given))
        else:
            recipe = _fill(self.recipe, iter(()))  # type: ignore[assignment]
        if recipe.get("models") == PINNED:
            recipe["models"] = {a: {"path": p} for a, p in (self.pinned or {}).items()}
        return recipe


def full(record: TrialRecord) -> TrialRecord:
    """A journal record as the driver wrote it: its recipe rebuilt (a new record where it was
    compact)."""
    if isinstance(record.recipe, Packed):
        return record.with_recipe(record.recipe.build())
    return record


def _length(x: object) -> int | None:
    """The length of a list, or of a list given as its JSON text (bytes of numbers)."""
    if isinstance(x, list):
        return len(x)
    if type(x) is bytes:
        return x.count(b",") + 1 if x.strip(b"[] ") else 0
    return None


# -- the reader -----------------------------------------------------------------------------
class Journal:
    """The journal read once and followed. `update()` parses only the lines appended since the
    last read; a journal that shrank, was replaced (a new file: the atomic rewrite of a repair)
    or rewritten in place is read again from the start. A last line without its newline is a
    write in progress (or cut by a kill): it is parsed on every read, never consumed, so it
    counts once complete (or, valid as it is, as the last record, as a kill between write and
    newline leaves it).

    `records`, `trials` and `bad` are the journal as journaled: a compact recipe is a `Packed`
    (`full(record)` rebuilds it), which readers that need no recipe (status, report, trackers)
    never pay for. They are the reader's own: read them, never change them."""

    def __init__(self, path: Path, pinned: dict[str, str] | None = None):
        self.path = Path(path)
        self.pinned = pinned
        self.reads = 0  # reads from the start of the file (a followed journal: one)
        self._reset()

    def _reset(self) -> None:
        self._ident: tuple[int, int] | None = None
        self._offset = 0
        self._head = b""  # the file's first bytes, and those just before _offset
        self._end = b""
        self._lines = 0  # line number of the last line consumed
        self._records: list[TrialRecord] = []
        self._bad: list[Bad] = []
        self._trials: dict[tuple[int, int], TrialRecord] = {}
        self.templates: dict[int, Template] = {}
        self._by_key: dict[str, Template] = {}
        self._tail = b""  # the unterminated last line, if any
        self._tail_record: TrialRecord | None = None
        self._tail_bad: Bad | None = None

    # -- views ------------------------------------------------------------------------------
    @property
    def records(self) -> list[TrialRecord]:
        extra = [self._tail_record] if self._tail_record is not None else []
        return self._records + extra

    @property
    def trials(self) -> Mapping[tuple[int, int], TrialRecord]:
        """(generation, index) -> the trial's latest state, fields merged over its records."""
        if self._tail_record is None:
            return MappingProxyType(self._trials)
        r = self._tail_record
        old = self._trials.get(r.key)
        return MappingProxyType({**self._trials, r.key: r if old is None else old.merged(r)})

    @property
    def bad(self) -> list[Bad]:
        return self._bad + ([self._tail_bad] if self._tail_bad is not None else [])

    @property
    def terminated(self) -> bool:
        """The file ends with a newline (or is empty): a new record starts a line of its own."""
        return not self._tail

    # -- reading ----------------------------------------------------------------------------
    def update(self) -> bool:
        """Read what was appended since the last call; True when anything changed."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            changed = self._ident is not None or bool(self._records or self._bad)
            if changed:
                self._reset()
            return changed
        with f:
            st = os.fstat(f.fileno())
            ident = (st.st_dev, st.st_ino)
            fresh = self._ident is None
            fd = f.fileno()
            if not fresh and (
                ident != self._ident
                or st.st_size < self._offset + len(self._tail)
                # rewritten in place (the same file, other bytes): its first or its last bytes
                # read differ (a change only in between is not seen: a journal is appended to,
                # and replaced whole)
                or os.pread(fd, len(self._head), 0) != self._head
                or os.pread(fd, len(self._end), self._offset - len(self._end)) != self._end
            ):
                self._reset()
                fresh = True
            if fresh:
                self._ident = ident
                self.reads += 1
            if not fresh and st.st_size == self._offset + len(self._tail):
                return False  # nothing new (the tail, if any, is as it was)
            f.seek(self._offset)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        with no_gc():
            for raw in data[:cut].split(b"\n")[:-1]:
                self._lines += 1
                if raw.strip():
                    self._take(self._lines, raw)
        self._offset += cut
        self._end = (self._end + data[:cut])[-_END:]
        if len(self._head) < _END:
            self._head = (self._head + data[:cut])[:_END]
        self._tail = data[cut:]
        self._tail_record, self._tail_bad = None, None
        if self._tail.strip():
            record, why = self._parse(self._tail, define=False)
            if record is None:
                self._tail_bad = (self._lines + 1, str(why), self._tail)
            else:
                self._tail_record = record
        return True

    def _take(self, n: int, raw: bytes) -> None:
        record, why = self._parse(raw, define=True)
        if record is None:
            self._bad.append((n, str(why), raw))
            return
        self._records.append(record)
        key = (record.generation, record.index)
        old = self._trials.get(key)
        self._trials[key] = record if old is None else old.merged(record)

    def _parse(self, raw: bytes, define: bool) -> tuple[TrialRecord | None, str | None]:
        record, why = parse_record(raw, lazy_x=True)
        if record is None:
            return None, why
        if "recipe" in record:
            packed, why = self._unpack(record, define)
            if why is not None:
                return None, why
            if packed is not None:
                record["recipe"] = packed
        return TrialRecord.from_json(record), None

    def _unpack(self, record: dict, define: bool) -> tuple[Packed | None, str | None]:
        """The record's recipe as a Packed where it is journaled compactly (None: as it is)."""
        r = record["recipe"]
        if not isinstance(r, dict):
            return None, None
        if "template" not in r:
            if r.get("models") != PINNED:
                return None, None  # the recipe whole, as runs before compact journals wrote it
            if self.pinned is None:
                return None, "its recipe names the pinned models, but run.yaml pins none"
            return Packed(self.pinned, recipe=r), None
        n, x = r.get("template"), record.get("x")
        length = _length(x)
        if type(n) is not int or length is None:
            return None, "a compact recipe without a template number or the trial's x"
        if "recipe" in r:  # this trial's recipe, and the template of those after it
            recipe, from_x = r["recipe"], r.get("from_x")
            if not isinstance(recipe, dict) or not isinstance(from_x, list):
                return None, f"recipe template {n} is not a recipe and its slots"
            if n in self.templates:
                return None, f"recipe template {n} is defined twice"
            if recipe.get("models") == PINNED and self.pinned is None:
                return None, "its recipe names the pinned models, but run.yaml pins none"
            defined = Template(n, recipe, from_x)
            if len(from_x) != len(defined.consts) or not all(
                j is None or (type(j) is int and 0 <= j < length) for j in from_x
            ):
                return None, f"recipe template {n}: its slots do not fit the recipe and its x"
            if define:
                self.templates[n] = defined
                self._by_key.setdefault(defined.key, defined)
            return Packed(self.pinned, template=defined, x=x), None
        template = self.templates.get(n)
        given = r.get("set", {})
        if template is None:
            return None, f"recipe template {n} is not defined on an earlier line"
        if template.reach >= length or not isinstance(given, dict):
            return None, f"a recipe of template {n} without the trial's x or its numbers"
        slots: dict[int, object] = {}
        for k, v in given.items():
            if not (k.isdigit() and int(k) < len(template.consts) and _is_number(v)):
                return None, f"a recipe of template {n}: slot {k!r} = {v!r} does not fit"
            slots[int(k)] = v
        return Packed(self.pinned, template=template, x=x, given=slots), None

    # -- writing ----------------------------------------------------------------------------
    def pack(self, records: Sequence[dict | TrialRecord]) -> bytes:
        """The lines that journal `records` (full recipes) compactly. Call on a journal that is
        up to date: its templates are the ones the file defines."""
        out: list[bytes] = []
        new: dict[str, Template] = {}
        count = len(self.templates)
        for record in records:
            r = json.loads(line(record))  # what a reader of the line will see, exactly
            if isinstance(r.get("recipe"), dict):
                r["recipe"], template = self._pack(r["recipe"], r.get("x"), new, count)
                if template is not None:
                    new[template.key] = template
                    count += 1
            out.append(line(r))
        return b"".join(out)

    def _pack(
        self, recipe: dict, x: object, new: dict[str, Template], count: int
    ) -> tuple[dict, Template | None]:
        """The recipe's compact form, and the template it defines (None: none)."""
        models, pinned = recipe.get("models"), self.pinned
        whole = recipe
        # the run's pinned models, in their order: journaled by name (run.yaml has the paths)
        if (
            isinstance(models, dict)
            and pinned is not None
            and list(models.items()) == [(a, {"path": p}) for a, p in pinned.items()]
        ):
            whole = {**recipe, "models": PINNED}
        xs = x if isinstance(x, list) else None
        if xs is None:
            return whole, None
        numbers: list = []
        key = _key(_strip(whole, numbers))
        template = self._by_key.get(key) or new.get(key)
        text = json.dumps(recipe)
        if template is not None and template.reach < len(xs):
            given = {}
            for k, (v, j, c) in enumerate(zip(numbers, template.from_x, template.consts)):
                if not _same(v, c if j is None else xs[j]):
                    given[k] = v
            packed = Packed(self.pinned, template=template, x=xs, given=given)
            if json.dumps(packed.build()) != text:
                return whole, None
            return {"template": template.number, "set": {str(k): v for k, v in given.items()}}, None
        if template is not None or count >= MAX_TEMPLATES:
            return whole, None
        first: dict[float, int] = {}
        for j, v in enumerate(xs):
            if type(v) is float:
                first.setdefault(v, j)
        from_x = []
        for v in numbers:
            j = first.get(v) if type(v) is float else None
            from_x.append(j if j is not None and _same(v, xs[j]) else None)
        number = max([*self.templates, *(t.number for t in new.values()), 0]) + 1
        template = Template(number, whole, from_x)
        if json.dumps(Packed(self.pinned, template=template, x=xs).build()) != text:
            return whole, None
        return {"template": number, "recipe": whole, "from_x": from_x}, template
