"""The journal at scale: compact recipes rebuilt exactly (the recipes the search decoded, the
same bits when merged); run directories written before compact journals read, resumed, reported
and exported unchanged; a followed journal parses each line once (appends, a line being written,
a journal shrunk, replaced or rewritten); status and report parse it once per command."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from evomerge.merge.engine import merge_to_dir
from evomerge.merge.recipe import Recipe
from evomerge.search.loop.driver import run_search, trial_seed
from evomerge.search.loop.workers import SerialExecutor
from evomerge.search.outputs.export import pick_trials
from evomerge.search.outputs.report import summarize, trials_frame, watch_report, write_report
from evomerge.search.run import journal as journal_module
from evomerge.search.run.journal import MAX_TEMPLATES, PINNED, Journal, full, line
from evomerge.search.run.rundir import RunDir
from evomerge.search.spaces import space_for
from evomerge.search.trial import Status, TrialRecord
from evomerge.search.watch.status import run_status
from tests.conftest import Stop, search_config, stopping_after


def _run(path, cfg, stop_after=None):
    run = RunDir.reopen(path, cfg) if (path / "run.yaml").exists() else RunDir.create(path, cfg)
    with contextlib.suppress(Stop):
        run_search(run, lambda: SerialExecutor(cfg), stopping_after(stop_after))
    return run


def _cfg(zoo):  # 3 generations of 4, the top 2 rescored at the end
    return search_config(
        zoo, fitness={**search_config(zoo).fitness.model_dump(), "rescore": {"top": 2}}
    )


def _as_before(path):
    """The run directory as evomerge wrote it before compact journals: run.yaml says
    evomerge-run/1 and every journal line holds its recipe whole (the same JSON lines the
    driver wrote then: the records are the driver's, only their recipes were journaled so)."""
    records = RunDir.reopen(path).records()
    meta = yaml.safe_load((path / "run.yaml").read_text())
    meta["format"] = "evomerge-run/1"
    (path / "run.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    (path / "trials.jsonl").write_bytes(b"".join(line(r) for r in records))


def _text(recipe) -> str:
    return json.dumps(recipe)


@pytest.fixture(scope="module")
def runs(tiny_zoo, tmp_path_factory):
    """ref (the whole search, compact journal) and cut (killed after generation 1)."""
    root = tmp_path_factory.mktemp("journal")
    cfg = _cfg(tiny_zoo)
    _run(root / "ref", cfg)
    _run(root / "cut", cfg, stop_after=4)
    return root


def _copy(runs, name, to):
    shutil.copytree(runs / name, to)
    return to


# -- compact recipes ------------------------------------------------------------------------


def test_compact_recipes_rebuild_exactly_what_the_search_decoded(runs, tiny_zoo, tmp_path):
    run = RunDir.reopen(runs / "ref")
    text = run.journal_path.read_text()
    asked = [json.loads(ln) for ln in text.splitlines() if '"ASKED"' in ln]
    # the model paths once (a template's), every other recipe a template and its seed
    assert text.count(str(tiny_zoo / "llama" / "add")) == 0
    assert all(r["recipe"].get("template") == 1 for r in asked)
    assert asked[0]["recipe"]["recipe"]["models"] == PINNED
    assert sum("set" in r["recipe"] for r in asked) == len(asked) - 1
    assert all(len(line(r)) < 2 * len(json.dumps(r["x"])) for r in asked[1:])
    space = space_for(run.config)
    trials = run.trials()
    assert len(trials) == 12
    for (g, i), t in trials.items():
        decoded = space.decode(t["x"], seed=trial_seed(run.config.cma.seed, g, i))
        assert _text(t["recipe"]) == _text(decoded.model_dump(mode="json", exclude_none=True))
    # what export and the rescoring merge: the same bits as the recipe the search scored
    best = run.ranked()[0]
    decoded = space.decode(best["x"], seed=trial_seed(run.config.cma.seed, *best_key(best)))
    merge_to_dir(Recipe.parse(best["recipe"]), tmp_path / "rebuilt")
    merge_to_dir(decoded, tmp_path / "decoded")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("rebuilt", "decoded"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert Recipe.load(runs / "ref" / "best" / "recipe.yaml") == Recipe.parse(best["recipe"])


def best_key(t: dict) -> tuple[int, int]:
    return t["generation"], t["index"]


_numbers = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1.0, 1]),
)
_leaves = st.one_of(_numbers, st.booleans(), st.none(), st.text(max_size=4))
_json = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=24,
)


def _renumber(shape: object, numbers: list) -> object:
    """`shape` with its numbers replaced, in order, by `numbers` (cycled)."""
    k = [0]

    def walk(node: object) -> object:
        if isinstance(node, dict):
            return {key: walk(v) for key, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if type(node) in (int, float) and numbers:
            k[0] += 1
            return numbers[(k[0] - 1) % len(numbers)]
        return node

    return walk(shape)


@settings(max_examples=200, deadline=None)
@given(
    shapes=st.lists(
        st.dictionaries(st.text(max_size=3), _json, max_size=4), min_size=1, max_size=3
    ),
    trials=st.lists(
        st.tuples(st.integers(0, 2), st.lists(_numbers, max_size=6), st.lists(st.integers(0, 9))),
        min_size=1,
        max_size=12,
    ),
    pinned=st.booleans(),
)
def test_any_recipe_journals_and_reads_back_as_the_same_json(
    tmp_path_factory, shapes, trials, pinned
):
    """Whatever a recipe holds (ints, floats equal to the genome's or not, 1 where x has 1.0,
    -0.0 where x has 0.0, booleans, nesting), and whichever structures repeat with other
    numbers, the journal reads back the same JSON text."""
    path = tmp_path_factory.mktemp("j") / "trials.jsonl"
    refs = {"a": "/models/a", "b": "org/b@" + "0" * 40} if pinned else None
    records = []
    for k, (which, genome, picks) in enumerate(trials):
        x = [float(v) for v in genome]
        # a recipe's numbers are mostly its genome's, some not (clipped, constants, a seed)
        pool = [x[p % len(x)] if x and p < 7 else [1, -0.0, 0.5][p % 3] for p in picks]
        recipe = _renumber(shapes[which % len(shapes)], pool)
        if pinned and k % 3 == 0:
            recipe = {**recipe, "models": {a: {"path": p} for a, p in refs.items()}}
        records.append({"generation": 1, "index": k, "status": "ASKED", "x": x, "recipe": recipe})
    writer = Journal(path, refs)
    for start in range(0, len(records), 3):  # appended in batches, as generations are
        writer.update()
        with open(path, "ab") as f:
            f.write(writer.pack(records[start : start + 3]))
    reader = Journal(path, refs)
    reader.update()
    assert reader.bad == []
    assert [json.dumps(full(r).to_json()) for r in reader.records] == [
        json.dumps(r) for r in records
    ]


def test_many_structures_are_capped_and_all_read_back(tmp_path):
    """Data-flow paths vary in length: past MAX_TEMPLATES structures a recipe is journaled
    whole; every one reads back exactly."""
    path = tmp_path / "trials.jsonl"
    records = [
        {
            "generation": 1,
            "index": n,
            "status": "ASKED",
            "x": [0.25 * n, 1.5],
            "recipe": {"data_flow": {"path": [{"layer": k, "scale": 1.5} for k in range(n + 1)]}},
        }
        for n in range(MAX_TEMPLATES + 8)
    ]
    j = Journal(path)
    for r in records:
        j.update()
        with open(path, "ab") as f:
            f.write(j.pack([r]))
    lines = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert sum("from_x" in ln["recipe"] for ln in lines) == MAX_TEMPLATES
    assert all("template" not in ln["recipe"] for ln in lines[MAX_TEMPLATES:])
    j.update()
    assert [full(r).to_json() for r in j.records] == records and j.bad == []


def test_a_compact_recipe_whose_template_line_is_lost_is_an_unreadable_line(tmp_path):
    path = tmp_path / "trials.jsonl"
    x = [0.5, 0.75]
    records = [
        {"generation": 1, "index": i, "status": "ASKED", "x": x, "recipe": {"w": x, "seed": i}}
        for i in range(3)
    ]
    j = Journal(path)
    path.write_bytes(j.pack(records))
    lines = path.read_bytes().splitlines(keepends=True)
    assert b'"from_x"' in lines[0] and b'"set"' in lines[1]
    path.write_bytes(b"{not json\n" + b"".join(lines[1:]))  # the defining line, torn
    j = Journal(path)
    j.update()
    assert j.records == []
    assert [(n, why) for n, why, _ in j.bad] == [
        (1, "not JSON"),
        (2, "recipe template 1 is not defined on an earlier line"),
        (3, "recipe template 1 is not defined on an earlier line"),
    ]


# -- run directories written before ---------------------------------------------------------

# A journal line as evomerge wrote it before compact journals (this search's config, its first
# trial): the recipe whole, the model paths in it.
OLD_ASKED = (
    '{"generation":1,"index":0,"status":"ASKED","x":[0.9006686658629756,0.7432668104000925,'
    "0.5314771107284108,0.5999493490330184,0.7052002930935106,0.9997370017361389,"
    "0.48492253246618244,0.5981626656788043,1.0567398178759957,0.8406210716691435,"
    "0.8671295527971611,0.7764157703102829,0.6241722041992671,0.8599205748451063,"
    '0.744265834432449,0.21174453437566287],"time":1796298222.702742,"recipe":{"format":'
    '"evomerge-recipe/1","dtype":"float32","allow_pickle":false,"models":{"base":{"path":'
    '"ZOO/llama/base"},"add":{"path":"ZOO/llama/add"},"caps":{"path":"ZOO/llama/caps"}},'
    '"parameter_space":{"method":"ties","base":"base","seed":3010016,"masks":"torch","groups":'
    '[{"layers":"embed","tensors":"all","params":{"add":{"weight":0.9006686658629756,"density":'
    '0.7432668104000925},"caps":{"weight":0.5314771107284108,"density":0.5999493490330184}}},'
    '{"layers":[0,1],"tensors":"all","params":{"add":{"weight":0.7052002930935106,"density":'
    '0.9997370017361389},"caps":{"weight":0.48492253246618244,"density":0.5981626656788043}}},'
    '{"layers":[1,2],"tensors":"all","params":{"add":{"weight":1.0567398178759957,"density":'
    '0.8406210716691435},"caps":{"weight":0.8671295527971611,"density":0.7764157703102829}}},'
    '{"layers":"head","tensors":"all","params":{"add":{"weight":0.6241722041992671,"density":'
    '0.8599205748451063},"caps":{"weight":0.744265834432449,"density":0.21174453437566287}}}]}}}'
)
OLD_COMPLETE = (
    '{"generation":1,"index":0,"status":"COMPLETE","fitness":0.125,"metrics":'
    '{"zoo_add_gen_search/exact_match":0.0,"zoo_caps_mc_search/acc":0.25},"merge_seconds":'
    '0.007070216999636614,"eval_seconds":0.019653115999972215,"examples":16,"worker":'
    '"vm:8162:cpu","error":null,"counts":{"zoo_add_gen_search":8,"zoo_caps_mc_search":8},'
    '"time":1796298222.7307928}'
)


def test_an_old_journal_line_reads_as_it_was_written(runs, tiny_zoo, tmp_path):
    path = _copy(runs, "cut", tmp_path / "r")
    _as_before(path)
    asked = OLD_ASKED.replace("ZOO", str(tiny_zoo))
    (path / "trials.jsonl").write_text(asked + "\n" + OLD_COMPLETE + "\n")
    run = RunDir.reopen(path)
    assert not run.compact  # a run started before keeps its journal's form
    records = run.records()
    assert [r.to_json() for r in records] == [json.loads(asked), json.loads(OLD_COMPLETE)]
    assert run.warnings == []
    (trial,) = pick_trials(run, "1:0", 1)
    assert _text(trial["recipe"]) == _text(json.loads(asked)["recipe"])
    assert Recipe.parse(trial["recipe"]).models["add"].path == str(tiny_zoo / "llama" / "add")
    status = run_status(path)
    assert (status.state, status.done, status.best) == ("crashed", 1, 0.125)
    assert "1 trials journaled" in (write_report(path) / "index.html").read_text()


def test_a_run_started_before_resumes_reports_and_exports_unchanged(runs, tiny_zoo, tmp_path):
    """A run directory of the old form, killed after generation 1, resumed by this code: the
    same decisions as an uninterrupted run, appended in the old form (whole recipes, run.yaml
    still evomerge-run/1), and the same winner, report and export picks."""
    path = _copy(runs, "cut", tmp_path / "old")
    _as_before(path)
    before = (path / "trials.jsonl").read_bytes()
    _run(path, _cfg(tiny_zoo))
    data = (path / "trials.jsonl").read_bytes()
    assert data.startswith(before) and b'"template"' not in data and b'"pinned"' not in data
    assert yaml.safe_load((path / "run.yaml").read_text())["format"] == "evomerge-run/1"
    old, ref = RunDir.reopen(path), RunDir.reopen(runs / "ref")

    def outcome(run):
        return {
            k: (
                t["status"],
                t["fitness"],
                t["x"],
                _text(t["recipe"]),
                t.get("rescored", {}).get("fitness"),
            )
            for k, t in sorted(run.trials().items())
        }

    assert outcome(old) == outcome(ref)
    assert (path / "best" / "recipe.yaml").read_text() == (
        runs / "ref" / "best" / "recipe.yaml"
    ).read_text()
    assert [_text(t["recipe"]) for t in pick_trials(old, None, 3)] == [
        _text(t["recipe"]) for t in pick_trials(ref, None, 3)
    ]
    tables = [summarize(r, trials_frame(r)) for r in (old, ref)]
    for title in ("trials by status", "fitness per generation"):
        assert tables[0][title].equals(tables[1][title]), title
    assert run_status(path).state == "finished"


def test_a_compact_run_resumes_exactly(runs, tiny_zoo, tmp_path):
    """Killed after generation 1 and resumed: the compact journal replays to the same
    decisions, recipes and winner as the uninterrupted search (the templates of the first
    session serve the second)."""
    path = _copy(runs, "cut", tmp_path / "cut")
    _run(path, _cfg(tiny_zoo))
    cut, ref = RunDir.reopen(path), RunDir.reopen(runs / "ref")
    assert {k: _text(t["recipe"]) for k, t in cut.trials().items()} == {
        k: _text(t["recipe"]) for k, t in ref.trials().items()
    }
    assert b'"from_x"' not in (path / "trials.jsonl").read_bytes().split(b"\n", 4)[4]
    assert (path / "best" / "recipe.yaml").read_text() == (
        runs / "ref" / "best" / "recipe.yaml"
    ).read_text()


# -- following the journal ------------------------------------------------------------------


@pytest.fixture
def parsed(monkeypatch):
    """How many journal lines have been parsed (each parse_record call)."""
    count = [0]
    real = journal_module.parse_record

    def counting(raw, **kw):
        count[0] += 1
        return real(raw, **kw)

    monkeypatch.setattr(journal_module, "parse_record", counting)
    return count


def test_a_followed_journal_parses_only_what_was_appended(runs, tmp_path, parsed):
    path = _copy(runs, "ref", tmp_path / "r") / "trials.jsonl"
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:10]))
    j = Journal(path, RunDir.reopen(path.parent).pinned)
    assert j.update() and len(j.records) == 10 and parsed[0] == 10
    assert not j.update() and parsed[0] == 10  # nothing new, nothing parsed

    with open(path, "ab") as f:  # two lines and the start of a third, still being written
        f.write(b"".join(lines[10:12]) + lines[12][:40])
    assert j.update() and len(j.records) == 12 and parsed[0] == 13  # the partial line: tried
    assert [n for n, _, _ in j.bad] == [13] and not j.terminated
    with open(path, "ab") as f:
        f.write(lines[12][40:])
    assert j.update() and len(j.records) == 13 and j.bad == [] and parsed[0] == 14
    assert j.reads == 1

    # a complete last line lacking only its newline counts, once
    with open(path, "ab") as f:
        f.write(lines[13].rstrip(b"\n"))
    j.update()
    assert len(j.records) == 14 and j.bad == []
    with open(path, "ab") as f:
        f.write(b"\n")
    j.update()
    assert len(j.records) == 14 and j.reads == 1
    assert {k: json.dumps(full(t).to_json()) for k, t in j.trials.items()} == {
        k: json.dumps(full(t).to_json()) for k, t in _fresh(path).trials.items()
    }


def _fresh(path) -> Journal:
    j = Journal(path, RunDir.reopen(path.parent).pinned)
    j.update()
    return j


@pytest.mark.parametrize("how", ["shrunk", "replaced", "rewritten in place"])
def test_a_journal_shrunk_or_replaced_is_read_again(runs, tmp_path, how):
    path = _copy(runs, "ref", tmp_path / "r") / "trials.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    j = Journal(path, RunDir.reopen(path.parent).pinned)
    j.update()
    if how == "shrunk":
        with open(path, "r+b") as f:
            f.truncate(sum(len(ln) for ln in lines[:5]))
    elif how == "replaced":  # a repair's atomic rewrite: a new file, here with a line more
        tmp = path.with_suffix(".new")
        tmp.write_bytes(b"".join(lines[:6]) + b"".join(lines[7:]) + lines[6])
        os.replace(tmp, path)
    else:  # the same file and size, other bytes (cp over it)
        swapped = lines[:-2] + [lines[-1], lines[-2]]
        with open(path, "r+b") as f:
            f.write(b"".join(swapped))
    assert j.update() and j.reads == 2
    fresh = _fresh(path)
    assert [json.dumps(full(r).to_json()) for r in j.records] == [
        json.dumps(full(r).to_json()) for r in fresh.records
    ]
    assert j.bad == fresh.bad


def test_status_and_report_parse_the_journal_once(runs, tmp_path, parsed, monkeypatch):
    path = _copy(runs, "ref", tmp_path / "r")
    lines = len(path.joinpath("trials.jsonl").read_bytes().splitlines())
    run = RunDir.reopen(path)
    write_report(run)
    summarize(run, trials_frame(run))  # what `evomerge report` prints
    assert parsed[0] == lines
    run_status(run)
    assert parsed[0] == lines

    # a watch: every round parses only what was appended since the last
    live = RunDir.reopen(_copy(runs, "cut", tmp_path / "live"))
    journal = live.journal_path
    extra = (runs / "ref" / "trials.jsonl").read_bytes().splitlines(keepends=True)
    start = len(journal.read_bytes().splitlines())
    parsed[0] = 0
    rounds = []

    def sleep(seconds):
        rounds.append(parsed[0])
        if len(rounds) < 4:  # the search goes on: two more lines per round
            with open(journal, "ab") as f:
                f.write(b"".join(extra[start + 2 * len(rounds) - 2 : start + 2 * len(rounds)]))
        else:  # the search ends: the watch writes a last report and returns
            release.set()
            thread.join()

    import threading

    held, release = threading.Event(), threading.Event()

    def holder():
        with live.lock():
            held.set()
            release.wait(30)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    try:
        watch_report(live, 1, log=lambda line: None, sleep=sleep)
    finally:
        release.set()
        thread.join()
    assert rounds == [start, start + 2, start + 4, start + 6]
    assert live.journal().reads == 1 and len(live.records()) == start + 6


_IMPORTS = """
import json, sys
if sys.argv[1] == "import":  # the modules alone
    for name in sys.argv[2:]:
        __import__(name)
else:
    from evomerge.search.cli import main as cli
    sys.argv = ["evomerge", *sys.argv[1:]]
    try:
        cli.main()
    except SystemExit as e:
        assert e.code in (0, None), e.code
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy})))
"""
_EVAL = ("torch", "transformers", "lm_eval", "ray", "vllm", "safetensors")


def _imported(heavy: tuple[str, ...], *args: str) -> list[str]:
    import subprocess
    import sys

    script = _IMPORTS.replace("{heavy}", repr(set(heavy)))
    res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_readers_import_no_torch(runs, tmp_path):
    """`evomerge status` on a finished run, in a fresh process, ends without having imported
    torch (a second of its start-up), the evaluation stack, pandas or matplotlib: run.yaml's
    schema and the method registry are read without them (merge.lazy). `evomerge report`'s
    modules import no torch either; the command itself imports none of the evaluation stack
    (on this run torch comes in only to read the base checkpoint's dtype: space.dtype auto)."""
    run = tmp_path / "run"
    shutil.copytree(runs / "ref", run)
    assert _imported((*_EVAL, "pandas", "matplotlib"), "status", str(run)) == []
    modules = ("evomerge.search.outputs.report", "evomerge.search.spaces", "evomerge.search.config")
    assert _imported(_EVAL, "import", *modules) == []
    assert _imported(_EVAL[1:], "report", str(run)) == []
    assert (run / "report" / "index.html").is_file() and (run / "report" / "genome.png").is_file()


# -- the typed record -------------------------------------------------------------------------
def test_status_says_whether_a_trial_is_finished():
    assert [s.is_finished() for s in Status] == [False, True, True]
    assert not TrialRecord(1, 0, rescored={"fitness": 0.5}).is_finished()  # an annotation


def test_old_lines_read_as_typed_records_and_write_back_byte_for_byte(tmp_path):
    """A /1 journal (whole recipes, fields of its time only), a field this version does not
    know, an annotation: attributes typed, absent fields at their defaults, and every line
    written again exactly as read (the journal's format does not change)."""
    lines = [
        OLD_ASKED,
        OLD_COMPLETE.replace('"time"', '"future_field":[1,{"a":2}],"time"'),
        '{"generation":1,"index":0,"rescored":{"fitness":0.5,"examples":80}}',
        '{"generation":1,"index":1,"status":"FAILED","x":[0.5,-1e-05],"time":1.0,'
        '"fitness":-1.0,"error":"decode: weights sum to zero"}',
    ]
    path = tmp_path / "trials.jsonl"
    path.write_text("\n".join(lines) + "\n")
    j = Journal(path)
    j.update()
    assert j.bad == [] and all(isinstance(r, TrialRecord) for r in j.records)
    assert [line(r) for r in j.records] == [(ln + "\n").encode() for ln in lines]
    asked, done, note, failed = j.records
    assert asked.status is Status.ASKED and asked.fitness is None and asked.metrics == {}
    assert asked.x == json.loads(OLD_ASKED)["x"] and asked.worker == "" and asked.race is None
    assert done.status is Status.COMPLETE and done.examples == 16 and done.error is None
    assert done.counts == {"zoo_add_gen_search": 8, "zoo_caps_mc_search": 8}
    assert done.extra == {"future_field": [1, {"a": 2}]} and "x" not in done
    assert note.status is None and note.rescored == {"fitness": 0.5, "examples": 80}
    assert failed.x == [0.5, -1e-05] and failed.is_finished() and failed.recipe is None
    trial = j.trials[1, 0]  # the three lines merged: the latest state, fields in first order
    merged = {**json.loads(lines[0]), **json.loads(lines[1]), **json.loads(lines[2])}
    assert trial.to_json() == merged and list(trial.to_json()) == list(merged)
    assert (trial.status, trial.fitness, trial.rescored["fitness"]) == (Status.COMPLETE, 0.125, 0.5)
    assert trial["fitness"] == 0.125 and trial.get("race") is None  # read as the dicts were


def test_a_lazily_read_x_is_the_x_json_reads(tmp_path):
    """`x` is kept as its text where the line has the driver's form, and reads as json.loads
    reads it; a line of another form, or an x that is not plain numbers, is parsed whole; a
    line cut inside or after x is unreadable as before."""
    xs = [[0.1, -2.5e-07, 1e300, 3.0], [], [5e-324, -0.0]]
    written = [
        {"generation": 1, "index": k, "status": "ASKED", "x": x, "time": 1.5}
        for k, x in enumerate(xs)
    ]
    other = '{"index":3,"generation":1,"status":"ASKED","x":[1.0,2.0],"time":1.5}'  # key order
    special = '{"generation":1,"index":4,"status":"ASKED","x":[NaN,1.0],"time":1.5}'
    cut = line(written[0]).decode()
    path = tmp_path / "trials.jsonl"
    text = "".join(line(r).decode() for r in written) + other + "\n" + special + "\n"
    path.write_text(text + cut[:30] + "\n" + cut[: cut.index("]") + 3] + "\n")
    j = Journal(path)
    j.update()
    records = {r.index: r for r in j.records}
    assert [type(records[k]._x) for k in range(5)] == [bytes, bytes, bytes, list, list]
    for k, x in enumerate(xs):
        assert json.dumps(records[k].x) == json.dumps(x)  # -0.0 and 5e-324 included
    assert records[3].x == [1.0, 2.0] and str(records[4].x) == "[nan, 1.0]"
    assert [(n, why) for n, why, _ in j.bad] == [(6, "not JSON"), (7, "not JSON")]
    assert line(records[0]) == line(written[0])  # written back as it was


def test_reading_a_journal_builds_records_cheaply(tmp_path):
    """Reading 10,000 lines into records and trial states costs little beside parsing them as
    plain JSON: the record is slotted and unvalidated, and x is not parsed (a guard against a
    costly record, at a loose bound: a machine's load varies)."""
    x = [0.123456789 * k for k in range(120)]
    rows = []
    for i in range(5000):
        rows.append(line({"generation": 1 + i // 20, "index": i % 20, "status": "ASKED", "x": x}))
        rows.append(
            line(
                {
                    "generation": 1 + i // 20,
                    "index": i % 20,
                    "status": "COMPLETE",
                    "fitness": 0.5,
                    "metrics": {"t/acc": 0.5},
                    "worker": "w",
                    "time": 2.0,
                }
            )
        )
    path = tmp_path / "trials.jsonl"
    path.write_bytes(b"".join(rows))
    t = time.process_time()
    j = Journal(path)
    j.update()
    journal = time.process_time() - t
    t = time.process_time()
    for raw in rows:
        json.loads(raw)
    plain = time.process_time() - t
    assert len(j.trials) == 5000 and j.trials[1, 0].x == x
    assert journal < 2 * plain, (journal, plain)
