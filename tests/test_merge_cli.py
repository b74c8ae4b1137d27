"""`evomerge merge` end to end, and every wrong input: one line, non-zero exit, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from evomerge.merge.engine import iter_merged, merge_to_dir, open_sources
from evomerge.merge.io.checkpoint import Checkpoint
from evomerge.merge.ops.registry import TensorInputs, get_method, merge_tensor
from evomerge.merge.recipe import Recipe
from evomerge.search.cli.main import app
from tests.conftest import recipe_dict

runner = CliRunner()


def _write(tmp_path, data, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _merge(tmp_path, data, *extra):
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(_write(tmp_path, data)), str(out), *extra])
    return result, out


def _assert_refused(result, out, pattern):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    text = " ".join(result.output.split())
    assert len(lines) <= 3 and "Traceback" not in result.output  # one (soft-wrapped) line
    assert pattern in text, text
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out")]


def test_ties_merge_of_three_checkpoints_loads_and_generates(tmp_path, llama_family):
    from transformers import AutoModelForCausalLM

    result, out = _merge(tmp_path, recipe_dict(llama_family, "ties"))
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
    assert ids.shape == (1, 8)
    # the merge is not a copy of any parent, and not NaN
    merged = load_file(out / "model.safetensors")
    base = load_file(llama_family["base"] / "model.safetensors")
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.isfinite(merged[w]).all() and not torch.equal(merged[w], base[w])
    assert Recipe.load(out / "evomerge_recipe.yaml") == Recipe.parse(recipe_dict(llama_family))


@pytest.mark.parametrize(
    "method",
    [
        "linear",
        "slerp",
        "task_arithmetic",
        "dare_ties",
        "dare_linear",
        "breadcrumbs_ties",
        "della",
        "della_linear",
    ],
)
def test_methods_merge_gpt2(tmp_path, gpt2_family, method):
    data = recipe_dict(gpt2_family, method)
    group = data["parameter_space"]["groups"][0]
    if method == "slerp":
        group["params"] = {"expert1": {}}
        group["t"] = 0.4
    merge_to_dir(Recipe.parse(data), tmp_path / "o")
    merged = load_file(tmp_path / "o" / "model.safetensors")
    assert set(merged) == set(load_file(gpt2_family["base"] / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in merged.values())


def test_random_methods_are_reproducible_from_the_seed(tmp_path, llama_family):
    data = recipe_dict(llama_family, "dare_ties")
    merge_to_dir(Recipe.parse(data), tmp_path / "a")
    merge_to_dir(Recipe.parse(data), tmp_path / "b")
    data["parameter_space"]["seed"] = 8
    merge_to_dir(Recipe.parse(data), tmp_path / "c")
    a, b, c = (load_file(tmp_path / x / "model.safetensors") for x in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_sharded_streaming_merge_equals_in_memory_merge(tmp_path, llama_family):
    from transformers import AutoModelForCausalLM

    sharded = {}
    for alias, path in llama_family.items():
        AutoModelForCausalLM.from_pretrained(path).save_pretrained(
            tmp_path / alias, max_shard_size="30KB"
        )
        shutil.copy(path / "config.json", tmp_path / alias / "config.json")
        sharded[alias] = tmp_path / alias
    data = recipe_dict(sharded, "ties")
    result, out = _merge(tmp_path, data, "--max-shard-size", "40KB")
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    streamed = Checkpoint(out)
    # in memory: whole state dicts, merged with the registry's function directly
    states = {a: load_file(p / "model.safetensors") for a, p in llama_family.items()}
    recipe = Recipe.parse(recipe_dict(llama_family, "ties"))
    ps = recipe.parameter_space
    group = ps.groups[0]
    for name in states["base"]:
        inputs = TensorInputs(
            base=states["base"][name],
            sources=[states["expert1"][name], states["expert2"][name]],
            params=[ps.model_values(group, a) for a in ("expert1", "expert2")],
            group=ps.group_values(group),
            normalize=ps.options_normalize,
            rescale=ps.options_rescale,
        )
        want = merge_tensor(get_method("ties"), inputs)
        assert torch.equal(streamed.get(name), want), name


def test_bfloat16_output_dtype(tmp_path, llama_family):
    data = recipe_dict(llama_family, "task_arithmetic")
    data["dtype"] = "bfloat16"
    merge_to_dir(Recipe.parse(data), tmp_path / "o")
    merged = load_file(tmp_path / "o" / "model.safetensors")
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_per_kind_groups_and_embed_head_groups(tmp_path, llama_family):
    data = recipe_dict(llama_family, "linear")
    p = {"expert1": {"weight": 1.0}}
    data["parameter_space"]["groups"] = [
        {"layers": [0, 2], "tensors": "attention", "params": {"base": {"weight": 1.0}}},
        {"layers": [0, 2], "tensors": "mlp", "params": p},
        {"layers": [0, 2], "tensors": "other", "params": {"expert2": {"weight": 1.0}}},
        {"layers": "embed", "params": p},
        {"layers": "head", "params": {"base": {}}},
    ]
    recipe = Recipe.parse(data)
    merged = dict(iter_merged(recipe, open_sources(recipe)))
    src = {a: load_file(p / "model.safetensors") for a, p in llama_family.items()}
    for name, want in [
        ("model.layers.1.self_attn.q_proj.weight", "base"),
        ("model.layers.1.mlp.down_proj.weight", "expert1"),
        ("model.layers.0.input_layernorm.weight", "expert2"),
        ("model.embed_tokens.weight", "expert1"),
        ("model.norm.weight", "base"),
        ("lm_head.weight", "base"),
    ]:
        assert torch.equal(merged[name], src[want][name]), name


@settings(max_examples=25, deadline=None)
@given(
    w=st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=2),
    d=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=2),
    method=st.sampled_from(["ties", "dare_ties", "dare_linear", "breadcrumbs"]),
    split=st.integers(1, 3),
    lam=st.floats(0.1, 2),
)
def test_recipe_round_trip_is_exact(w, d, method, split, lam):
    params = {"m1": {"weight": w[0], "density": d[0]}, "m2": {"weight": w[1], "density": d[1]}}
    data = {
        "models": {"b": {"path": "/x/b"}, "m1": {"path": "/x/m1"}, "m2": {"path": "/x/m2"}},
        "parameter_space": {
            "method": method,
            "base": "b",
            "normalize": False,
            "lambda": lam,
            "groups": [
                {"layers": [0, split], "params": params},
                {"layers": [split, 4], "params": params},
                {"layers": "embed", "params": params},
            ],
        },
    }
    r = Recipe.parse(data)
    again = Recipe.parse(yaml.safe_load(r.to_yaml()))
    assert again == r and again.to_yaml() == r.to_yaml()


# -- wrong input ----------------------------------------------------------------------------


def _cases(fam):
    """name -> (mutate recipe dict, expected fragment of the one-line error)."""

    def ps(d):
        return d["parameter_space"]

    def group(d):
        return ps(d)["groups"][0]

    return {
        "unknown method": (lambda d: ps(d).update(method="tie"), "did you mean 'ties'"),
        "missing path": (
            lambda d: d["models"]["expert1"].update(path="/nope"),
            "models.expert1: model path /nope does not exist",
        ),
        "density": (
            lambda d: group(d)["params"]["expert1"].update(density=1.5),
            "params.expert1.density: must be in (0, 1], got 1.5",
        ),
        "zero weights": (
            lambda d: (
                ps(d).update(normalize=True),
                group(d)["params"].update(expert1={"weight": 1.0}, expert2={"weight": -1.0}),
            ),
            "weights sum to zero",
        ),
        "overlap": (
            lambda d: ps(d)["groups"].append({"layers": [1, 2], "params": {}}),
            "overlap at layer 1",
        ),
        "uncovered": (
            lambda d: group(d).update(layers=[0, 1]),
            "layer 1 (attention tensors) is in no group",
        ),
        "unknown field": (
            lambda d: ps(d).update(densty=0.5),
            "parameter_space: densty: unknown field",
        ),
        "unknown alias": (lambda d: group(d)["params"].update(mth={}), "'mth' is not in models"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown method",
        "missing path",
        "density",
        "zero weights",
        "overlap",
        "uncovered",
        "unknown field",
        "unknown alias",
    ],
)
def test_wrong_recipe_is_refused(tmp_path, llama_family, case):
    data = recipe_dict(llama_family, "ties")
    mutate, fragment = _cases(llama_family)[case]
    mutate(data)
    result, out = _merge(tmp_path, data)
    _assert_refused(result, out, fragment)


def _copy_family(tmp_path, fam):
    copies = {}
    for alias, p in fam.items():
        copies[alias] = tmp_path / "models" / alias
        shutil.copytree(p, copies[alias])
    return copies


def test_pickle_checkpoint_refused_unless_allowed(tmp_path, llama_family):
    fam = _copy_family(tmp_path, llama_family)
    st_file = fam["expert1"] / "model.safetensors"
    torch.save(load_file(st_file), fam["expert1"] / "pytorch_model.bin")
    st_file.unlink()
    data = recipe_dict(fam, "ties")
    result, out = _merge(tmp_path, data)
    _assert_refused(result, out, "pickle weights")
    data["allow_pickle"] = True
    result, out = _merge(tmp_path, data)
    assert result.exit_code == 0, result.output


def test_truncated_checkpoint_refused(tmp_path, llama_family):
    fam = _copy_family(tmp_path, llama_family)
    f = fam["expert2"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    result, out = _merge(tmp_path, recipe_dict(fam, "ties"))
    _assert_refused(result, out, "truncated")


def test_disagreeing_models_refused(tmp_path, llama_family):
    from evomerge.merge.synthetic import make_family

    other = make_family(tmp_path / "wide", "llama", experts=0, hidden_size=64)
    fam = dict(llama_family, expert2=other["base"])
    result, out = _merge(tmp_path, recipe_dict(fam, "ties"))
    _assert_refused(result, out, "tensor 'model.embed_tokens.weight': shape [128, 32]")
    vocab = make_family(tmp_path / "vocab", "llama", experts=0, vocab_size=100)
    result, out = _merge(tmp_path, recipe_dict(dict(llama_family, expert2=vocab["base"]), "ties"))
    _assert_refused(result, out, "different vocabulary sizes (128 vs 100")
    gpt = make_family(tmp_path / "gpt", "gpt2", experts=0)
    result, out = _merge(tmp_path, recipe_dict(dict(llama_family, expert2=gpt["base"]), "ties"))
    _assert_refused(result, out, "different architectures")


def test_tensor_in_one_model_only_refused(tmp_path, llama_family):
    fam = _copy_family(tmp_path, llama_family)
    f = fam["expert1"] / "model.safetensors"
    state = load_file(f)
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, f)
    result, out = _merge(tmp_path, recipe_dict(fam, "ties"))
    _assert_refused(result, out, "tensor 'model.layers.0.extra.weight' is only in model 'expert1'")


def test_existing_output_needs_force(tmp_path, llama_family):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(
        app, ["merge", str(_write(tmp_path, recipe_dict(llama_family))), str(out)]
    )
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only what evomerge merge wrote: the user's own folder is refused
    recipe = _write(tmp_path, recipe_dict(llama_family))
    result = runner.invoke(app, ["merge", str(recipe), str(out), "--force"])
    assert result.exit_code == 2 and "not written by evomerge merge" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    mine = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(recipe), str(mine)]).exit_code == 0
    first = (mine / "model.safetensors").stat().st_mtime_ns
    result = runner.invoke(app, ["merge", str(recipe), str(mine), "--force"])
    assert result.exit_code == 0 and (mine / "model.safetensors").stat().st_mtime_ns != first


@pytest.mark.parametrize("fail_after", [0, 1 << 20])  # the first write, or one mid-shard
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, fail_after):
    """ENOSPC while the shards are written (O_DIRECT staging or not): exit 2, one line naming
    the output and the fix, no output and no staging directory left behind."""
    import errno

    from evomerge.merge.io import safetensors_io
    from evomerge.merge.synthetic import make_family

    paths = make_family(tmp_path / "fam", "llama", hidden_size=256, vocab_size=4096)
    written = [0]
    real = safetensors_io._write_all

    def disk_full(fd, data):
        if written[0] + len(data) > fail_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += len(data)
        real(fd, data)

    monkeypatch.setattr(safetensors_io, "_write_all", disk_full)
    for direct in (True, False):
        monkeypatch.setattr(safetensors_io, "DIRECT_IO", direct)
        result, out = _merge(tmp_path, recipe_dict(paths, "ties"), "--max-shard-size", "2MB")
        _assert_refused(result, out, f"{out}: No space left on device; free some space")
