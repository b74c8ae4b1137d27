"""The bad-input catalogue: recipes, configs, model folders, run directories and CLI options that
are wrong, broken or hostile. Every case must end with exit code 2 and one line per problem
naming the file, field or tensor, with no traceback, nothing written or deleted, and no code
from the input executed (the `security` cases plant code that would leave a marker file)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from evomerge.search.cli.main import app
from tests.conftest import recipe_dict, search_config

runner = CliRunner()
MARKER = "code-ran"  # a planted payload creates this file: its existence means code ran


@dataclass
class Case:
    setup: Callable[[Path, dict, Path], list[str]]  # (tmp, family, zoo) -> CLI arguments
    fragment: str  # expected in the error line
    lines: int = 1  # problems expected (one line each)


# -- helpers that build broken inputs -----------------------------------------------------------


def _recipe(tmp: Path, fam: dict, method: str = "ties", edit=None, raw: str | None = None) -> Path:
    path = tmp / "recipe.yaml"
    if raw is not None:
        path.write_text(raw)
        return path
    data = recipe_dict(fam, method)
    if edit:
        edit(data)
    path.write_text(yaml.safe_dump(data))
    return path


def _merge(edit=None, method="ties", raw=None, extra=()):
    def setup(tmp, fam, zoo):
        return ["merge", str(_recipe(tmp, fam, method, edit, raw)), str(tmp / "out"), *extra]

    return setup


def _ps(d):
    return d["parameter_space"]


def _group(d):
    return _ps(d)["groups"][0]


def _model_copy(tmp: Path, fam: dict, name: str = "broken") -> Path:
    dst = tmp / name
    shutil.copytree(fam["expert1"], dst)
    return dst


def _with_model(break_it: Callable[[Path], None], method: str = "ties"):
    """merge a recipe whose expert1 is a copy of the family's, broken by `break_it`."""

    def setup(tmp, fam, zoo):
        folder = _model_copy(tmp, fam)
        break_it(folder)
        data = recipe_dict({**fam, "expert1": folder}, method)
        path = tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(data))
        return ["merge", str(path), str(tmp / "out")]

    return setup


def _eval_model(break_it: Callable[[Path], None]):
    def setup(tmp, fam, zoo):
        folder = _model_copy(tmp, fam)
        break_it(folder)
        return ["eval", "--model", str(folder), "--tasks", "zoo_add_gen_search", "--zoo", str(zoo)]

    return setup


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _rewrite_header(folder: Path, edit) -> None:
    """Rewrite the safetensors header of a model's one file (the tensor data unchanged)."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _first_tensor(header: dict) -> dict:
    return next(v for k, v in header.items() if k != "__metadata__")


def _nan_tensor(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    save_file(state, folder / "model.safetensors")


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickle_only(folder: Path, payload: bool = False) -> None:
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    if payload:
        with open(folder / "pytorch_model.bin", "wb") as f:
            pickle.dump({"weights": state, "x": _Payload(folder.parent / MARKER)}, f)
    else:
        torch.save(state, folder / "pytorch_model.bin")


def _custom_code(folder: Path) -> None:
    """A folder whose config asks for its own modeling code, which would leave the marker."""
    (folder / "modeling_evil.py").write_text(
        f"open({str(folder.parent / MARKER)!r}, 'w').write('ran')\n"
    )
    _edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})


def _custom_tokenizer(folder: Path) -> None:
    (folder / "tokenization_evil.py").write_text(
        f"open({str(folder.parent / MARKER)!r}, 'w').write('ran')\n"
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})
    )


def _search_check(edit):
    def setup(tmp, fam, zoo):
        data = search_config(zoo).dump()
        edit(data, tmp)
        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        return ["search", str(path), "--check", "--run-dir", str(tmp / "run")]

    return setup


def _run_dir(tmp: Path, zoo: Path) -> Path:
    """A run directory with a config and no trials (as `evomerge search` leaves one at start)."""
    from evomerge.search.run.rundir import RunDir

    return RunDir.create(tmp / "run", search_config(zoo)).path


def _on_run(command, edit=None, extra=()):
    def setup(tmp, fam, zoo):
        run = _run_dir(tmp, zoo)
        if edit:
            edit(run)
        return [*command, str(run), *extra]

    return setup


# -- the catalogue ------------------------------------------------------------------------------


def _untouched_layers(d):
    d["parameter_space"]["groups"].append({"layers": [1, 2], "params": {"expert1": {}}})


CASES: dict[str, Case] = {
    # recipes
    "recipe missing": Case(
        lambda t, f, z: ["merge", str(t / "nope.yaml"), str(t / "o")], "recipe file not found"
    ),
    "recipe is a directory": Case(
        lambda t, f, z: ["merge", str(t), str(t / "o")], "is a directory, not a recipe"
    ),
    "recipe not text": Case(
        lambda t, f, z: (
            t.joinpath("r.yaml").write_bytes(b"\xff\xfe\x00\x81"),
            ["merge", str(t / "r.yaml"), str(t / "o")],
        )[1],
        "not a text file",
    ),
    "recipe YAML syntax": Case(_merge(raw="models: [a, b\nformat: x"), "not valid YAML"),
    "recipe a list": Case(_merge(raw="- 1\n- 2\n"), "Input should be a valid dictionary"),
    "recipe duplicate key": Case(
        _merge(raw="dtype: float32\ndtype: bfloat16\n"), "key 'dtype' appears twice"
    ),
    "recipe unknown field": Case(
        _merge(lambda d: d.update(dtpye="float32")), "dtpye: unknown field"
    ),
    "recipe wrong format": Case(_merge(lambda d: d.update(format="evomerge-recipe/9")), "format"),
    "recipe bad dtype": Case(_merge(lambda d: d.update(dtype="float8")), "dtype"),
    "recipe no stage": Case(
        _merge(lambda d: d.pop("parameter_space")), "needs a parameter_space stage"
    ),
    "unknown method": Case(_merge(lambda d: _ps(d).update(method="tie")), "did you mean 'ties'"),
    "method needs a base": Case(_merge(lambda d: _ps(d).pop("base")), "needs a base model"),
    "base not in models": Case(
        _merge(lambda d: _ps(d).update(base="bse")), "'bse' is not in models"
    ),
    "group alias unknown": Case(
        _merge(lambda d: _group(d)["params"].update(mth={})), "'mth' is not in models"
    ),
    "density above 1": Case(
        _merge(lambda d: _group(d)["params"]["expert1"].update(density=1.5)),
        "density: must be in (0, 1], got 1.5",
    ),
    "density zero": Case(
        _merge(lambda d: _group(d)["params"]["expert1"].update(density=0.0)),
        "density: must be in (0, 1], got 0",
    ),
    "weight NaN": Case(
        _merge(lambda d: _group(d)["params"]["expert1"].update(weight=float("nan"))),
        "expert1.weight: Input should be a finite number",
    ),
    "lambda NaN": Case(
        _merge(lambda d: _ps(d).update({"lambda": float("nan")})), "lambda: must be a finite number"
    ),
    "lambda inf in a group": Case(
        _merge(lambda d: _group(d).update({"lambda": float("inf")})),
        "lambda: must be a finite number",
    ),
    "parameter of another method": Case(
        _merge(lambda d: _group(d)["params"]["expert1"].update(gamma=0.1)), "gamma: unknown field"
    ),
    "groups overlap": Case(_merge(_untouched_layers), "overlap at layer 1"),
    "layer beyond the model": Case(
        _merge(lambda d: _group(d).update(layers=[0, 9])), "layer 2 does not exist"
    ),
    "empty layer range": Case(
        _merge(lambda d: _group(d).update(layers=[1, 1])), "need 0 <= start < end"
    ),
    "layer in no group": Case(
        _merge(lambda d: _group(d).update(layers=[0, 1])),
        "layer 1 (attention tensors) is in no group",
    ),
    "slerp with two models": Case(
        _merge(method="slerp"), "slerp merges exactly 1 model(s) besides the base"
    ),
    "weights sum to zero": Case(
        _merge(
            lambda d: (
                _ps(d).update(normalize=True),
                _group(d)["params"].update(expert1={"weight": 1.0}, expert2={"weight": -1.0}),
            )
        ),
        "weights sum to zero",
    ),
    "normalize for slerp": Case(
        _merge(
            lambda d: (_ps(d).update(normalize=True), _group(d)["params"].pop("expert2")),
            method="slerp",
        ),
        "normalize: slerp does not read it",
    ),
    "model path missing": Case(
        _merge(lambda d: d["models"]["expert1"].update(path="/nope")),
        "models.expert1: model path /nope does not exist",
    ),
    "model path is a file": Case(
        lambda t, f, z: _merge(
            lambda d: d["models"]["expert1"].update(path=str(f["base"] / "config.json"))
        )(t, f, z),
        "is a file, not a model directory",
    ),
    "flow hop unknown": Case(
        _merge(
            lambda d: d.update(
                data_flow={"embed_from": "base", "path": [{"model": "x", "layer": 0}]}
            )
        ),
        "data_flow.path.0.model: 'x' is not in models",
    ),
    "flow scale zero": Case(
        _merge(
            lambda d: d.update(
                data_flow={
                    "embed_from": "base",
                    "path": [{"model": "base", "layer": 0, "scale": 0}],
                }
            )
        ),
        "must be positive",
    ),
    "shard size nonsense": Case(
        _merge(extra=("--max-shard-size", "lots")), "--max-shard-size 'lots'"
    ),
    "device banana": Case(
        _merge(extra=("--device", "banana")), "--device 'banana': use cpu, cuda or cuda:N"
    ),
    "device without CUDA": Case(_merge(extra=("--device", "cuda")), "CUDA is not available here"),
    # outputs that would destroy inputs or foreign data
    "out is an input model": Case(
        lambda t, f, z: ["merge", str(_recipe(t, f)), str(f["expert1"]), "--force"], "is the input"
    ),
    "out contains the inputs": Case(
        lambda t, f, z: ["merge", str(_recipe(t, f)), str(f["base"].parent), "--force"],
        "contains the input",
    ),
    "out inside an input": Case(
        lambda t, f, z: ["merge", str(_recipe(t, f)), str(f["base"] / "sub"), "--force"],
        "lies inside the input",
    ),
    "out contains the recipe": Case(
        lambda t, f, z: ["merge", str(_recipe(t, f)), str(t), "--force"], "contains the input"
    ),
    "out is a regular file": Case(
        lambda t, f, z: (
            t.joinpath("file").write_text("mine"),
            ["merge", str(_recipe(t, f)), str(t / "file"), "--force"],
        )[1],
        "is a file, not a directory",
    ),
    "out exists": Case(
        lambda t, f, z: (t.joinpath("out").mkdir(), ["merge", str(_recipe(t, f)), str(t / "out")])[
            1
        ],
        "exists; pass --force",
    ),
    "out foreign with force": Case(
        lambda t, f, z: (
            t.joinpath("out").mkdir(),
            t.joinpath("out", "mine.txt").write_text("x"),
            ["merge", str(_recipe(t, f)), str(t / "out"), "--force"],
        )[2],
        "not written by evomerge merge",
    ),
    "out under a file": Case(
        lambda t, f, z: (
            t.joinpath("file").write_text("mine"),
            ["merge", str(_recipe(t, f)), str(t / "file" / "out")],
        )[1],
        "file is a file, not a directory",
    ),
    # model folders
    "config.json missing": Case(
        _with_model(lambda m: (m / "config.json").unlink()), "config.json: missing"
    ),
    "config.json not JSON": Case(
        _with_model(lambda m: (m / "config.json").write_text("{nope")),
        "config.json: not valid JSON",
    ),
    "config.json a list": Case(
        _with_model(lambda m: (m / "config.json").write_text("[1, 2]")), "a list, not a JSON object"
    ),
    "config.json without layers": Case(
        _with_model(lambda m: _edit_config(m, num_hidden_layers=None)),
        "no positive integer num_hidden_layers",
    ),
    "config disagrees with weights": Case(
        _with_model(lambda m: _edit_config(m, num_hidden_layers=3)),
        "says 3 layers, but the weights have layers 0..1",
    ),
    "no weights": Case(
        _with_model(lambda m: (m / "model.safetensors").unlink()), "no weights (*.safetensors)"
    ),
    "pickle weights refused": Case(_with_model(_pickle_only), "holds pickle weights"),
    "header truncated": Case(
        _with_model(lambda m: (m / "model.safetensors").write_bytes(b"\x01\x02")),
        "truncated safetensors file",
    ),
    "header not JSON": Case(
        _with_model(
            lambda m: (m / "model.safetensors").write_bytes(
                struct.pack("<Q", 4) + b"{x!}" + b"\0" * 8
            )
        ),
        "corrupt safetensors header (not JSON)",
    ),
    "negative dimension": Case(
        _with_model(
            lambda m: _rewrite_header(
                m, lambda h: _first_tensor(h).update(shape=[-1, *_first_tensor(h)["shape"][1:]])
            )
        ),
        "corrupt header entry for tensor",
    ),
    "fp8 tensor": Case(
        _with_model(
            lambda m: _rewrite_header(m, lambda h: _first_tensor(h).update(dtype="F8_E4M3"))
        ),
        "has dtype F8_E4M3, which evomerge does not support",
    ),
    "data truncated": Case(
        _with_model(
            lambda m: (m / "model.safetensors").write_bytes(
                (m / "model.safetensors").read_bytes()[:-100]
            )
        ),
        "truncated: tensor",
    ),
    "NaN in a source": Case(_with_model(_nan_tensor), "tensor 'model.layers.0.mlp.up_proj.weight'"),
    "index lists a missing shard": Case(
        _with_model(
            lambda m: (m / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"a": "model-2.safetensors"}})
            )
        ),
        "lists shard model-2.safetensors, which is missing",
    ),
    "index corrupt": Case(
        _with_model(lambda m: (m / "model.safetensors.index.json").write_text("[]")),
        "corrupt index",
    ),
    "vocabularies disagree": Case(
        _with_model(lambda m: _edit_config(m, vocab_size=999)), "different vocabulary sizes"
    ),
    "model_type unknown": Case(
        _eval_model(lambda m: _edit_config(m, model_type="llamaxx")), "model_type 'llamaxx'"
    ),
    "eval on pickle-only weights": Case(_eval_model(_pickle_only), "holds pickle weights"),
    # configs (search --check reports every problem, one line each)
    "config missing": Case(
        lambda t, f, z: ["search", str(t / "nope.yaml"), "--check"], "config file not found"
    ),
    "no tasks": Case(
        _search_check(lambda d, t: d["fitness"].update(tasks=[])),
        "fitness.tasks: List should have at least 1 item",
    ),
    "penalty NaN": Case(
        _search_check(lambda d, t: d.update(penalty=float("nan"))),
        "penalty: Input should be a finite number",
    ),
    "negative limit": Case(
        _search_check(lambda d, t: d["fitness"].update(limit=-5)),
        "fitness.limit: must be a count >= 1",
    ),
    "three schema errors": Case(
        _search_check(
            lambda d, t: (
                d.update(penalty=float("nan")),
                d["fitness"].update(limit=-5),
                d["cma"].update(budget=0),
            )
        ),
        "cma.budget",
        lines=3,
    ),
    "two unknown tasks": Case(
        _search_check(
            lambda d, t: d["fitness"].update(
                tasks=[{"name": "zoo_ad_gen_search"}, {"name": "zoo_cap_gen_search"}]
            )
        ),
        "did you mean zoo_caps_gen_search",
        lines=2,
    ),
    "base not in the pool": Case(
        _search_check(lambda d, t: d.update(base="bse")), "base 'bse' is not in models"
    ),
    "init of an unknown model": Case(
        _search_check(lambda d, t: d["space"].update(init={"nxt": {"weight": 0.0}})),
        "space.init: 'nxt' is not in models",
    ),
    "gene the method lacks": Case(
        _search_check(lambda d, t: d["space"].update(genes=["weight", "gamma"])),
        "'gamma' is not a parameter of ties",
    ),
    "gene range invalid": Case(
        _search_check(
            lambda d, t: d["space"].update(
                ranges={"density": {"low": 0.5, "high": 1.5, "init": 1.0}}
            )
        ),
        "ranges.density: density must be in (0, 1]",
    ),
    "dfs alias unknown": Case(
        _search_check(lambda d, t: d.update(dfs={"models": ["adx"], "embed_from": "add"})),
        "dfs: 'adx' is not in models",
    ),
    "model unknown to transformers": Case(
        _search_check(
            lambda d, t: (
                shutil.copytree(Path(d["models"]["caps"]["path"]), t / "weird"),
                _edit_config(t / "weird", model_type="llamaxx"),
                d["models"]["caps"].update(path=str(t / "weird")),
            )
        ),
        "model_type 'llamaxx'",
    ),
    "run dir is a file": Case(
        _search_check(lambda d, t: (t / "run").write_text("x")),
        "is a file; choose another --run-dir",
    ),
    # run directories
    "resume: not a run": Case(
        lambda t, f, z: ["resume", str(t)], "not a run directory (no run.yaml)"
    ),
    "resume: a file": Case(
        lambda t, f, z: (t.joinpath("f").write_text("x"), ["resume", str(t / "f")])[1], "is a file"
    ),
    "resume: run.yaml corrupt": Case(
        _on_run(["resume"], lambda r: (r / "run.yaml").write_text("format: [")),
        "run.yaml: not valid YAML",
    ),
    "resume: wrong format": Case(
        _on_run(["resume"], lambda r: (r / "run.yaml").write_text("format: other/1\n")),
        "format 'other/1'",
    ),
    "report: no trials yet": Case(_on_run(["report"]), "no trials journaled yet"),
    "export: bad trial id": Case(
        _on_run(["export"], extra=("--out", "/tmp/evomerge-never", "--trial", "x")),
        "--trial 'x': use GENERATION:INDEX",
    ),
    "export: out is the run": Case(
        lambda t, f, z: ["export", str(_run_dir(t, z)), "--out", str(t / "run"), "--force"],
        "is the input",
    ),
    # command-line options
    "eval: both model and recipe": Case(
        lambda t, f, z: ["eval", "--model", str(f["base"]), "--recipe", "r.yaml", "--tasks", "x"],
        "exactly one of --model DIR or --recipe FILE",
    ),
    "eval: bad task weight": Case(
        lambda t, f, z: ["eval", "--model", str(f["base"]), "--tasks", "a:acc:x", "--zoo", str(z)],
        "--tasks 'a:acc:x'",
    ),
    "eval: negative limit": Case(
        lambda t, f, z: ["eval", "--model", str(f["base"]), "--tasks", "a", "--limit", "-1"],
        "--limit -1",
    ),
    "eval: include not a folder": Case(
        lambda t, f, z: [
            "eval",
            "--model",
            str(f["base"]),
            "--tasks",
            "a",
            "--include",
            str(t / "nope"),
        ],
        "--include",
    ),
    "eval: device banana": Case(
        lambda t, f, z: ["eval", "--model", str(f["base"]), "--tasks", "a", "--device", "banana"],
        "--device 'banana'",
    ),
    "zoo: unknown size": Case(
        lambda t, f, z: ["zoo", "build", "--size", "huge", "--out", str(t / "z")], "--size 'huge'"
    ),
}

SECURITY: dict[str, Case] = {
    "pickle payload with allow_pickle": Case(
        _with_model(lambda m: _pickle_only(m, payload=True)), "cannot be loaded as plain tensors"
    ),
    "model folder's own code": Case(
        _eval_model(_custom_code), "needs its own Python code (auto_map)"
    ),
    "tokenizer's own code": Case(_eval_model(_custom_tokenizer), "no usable tokenizer"),
}


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and ".hf-datasets" not in p.parts
    }


def _refused(case: Case, tmp: Path, fam: dict, zoo: Path) -> str:
    args = case.setup(tmp, fam, zoo)
    before = {"tmp": _tree(tmp), "fam": _tree(fam["base"].parent)}
    result = runner.invoke(app, args)
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out and isinstance(result.exception, SystemExit | None), out
    lines = [ln for ln in out.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert len(lines) == case.lines and all(ln.startswith("error: ") for ln in lines), out
    assert case.fragment in " ".join(out.split()), out
    assert {"tmp": _tree(tmp), "fam": _tree(fam["base"].parent)} == before, "something was written"
    return out


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from evomerge.merge.synthetic import make_family

    return make_family(tmp_path_factory.mktemp("catalogue-family"), "llama", experts=2)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_nothing_changes(name, tmp_path, fam, tiny_zoo):
    _refused(CASES[name], tmp_path, fam, tiny_zoo)


@pytest.mark.security
@pytest.mark.parametrize("name", list(SECURITY))
def test_hostile_input_runs_no_code(name, tmp_path, fam, tiny_zoo):
    case = SECURITY[name]
    if name.startswith("pickle"):  # the payload must be refused even where pickle is allowed
        original = case.setup

        def allowed(t, f, z):
            args = original(t, f, z)
            recipe = Path(args[1])
            data = yaml.safe_load(recipe.read_text()) | {"allow_pickle": True}
            recipe.write_text(yaml.safe_dump(data))
            return args

        case = Case(allowed, case.fragment)
    out = _refused(case, tmp_path, fam, tiny_zoo)
    assert not (tmp_path / MARKER).exists(), "the input's code ran"
    assert "weights_only=False" not in out  # never relay torch's unsafe workaround


def test_the_catalogue_is_large():
    assert len(CASES) + len(SECURITY) >= 60
