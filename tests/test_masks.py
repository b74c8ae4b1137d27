"""Counter-based random masks: the same bits on any chunking, thread count and device; recipes
made with the sequential generator still rebuild their old bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from evomerge.merge.engine import merge_to_dir, tensor_seed
from evomerge.merge.ops import kernels, masks
from evomerge.merge.ops.masks import CounterDraws, stream_key, uniform_np, uniform_torch
from evomerge.merge.ops.registry import METHODS, TensorInputs, merge_tensor, merge_tensor_into
from evomerge.merge.ops.sparsify import Rescale
from evomerge.merge.parallel import Workers
from evomerge.merge.recipe import Recipe
from tests.conftest import recipe_dict


@settings(max_examples=60, deadline=None)
@given(
    key=st.integers(0, 2**32 - 1),
    lo=st.integers(0, 2**32 - 5000),
    n=st.integers(1, 4000),
)
def test_numpy_and_torch_draws_are_the_same_bits(key, lo, n):
    """The CPU's NumPy path and the integer torch path (what a GPU runs) agree bit for bit, at
    any offset up to 2^32: so a mask drawn on a GPU is the mask drawn on a CPU."""
    a = uniform_np(key, lo, lo + n)
    b = uniform_torch(key, lo, lo + n, "cpu").numpy()
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    assert a.min() >= 0 and a.max() < 1


def test_draws_are_uniform_and_streams_independent():
    n = 1 << 20
    keys = [stream_key(tensor_seed(7, "model.layers.0.mlp.up_proj.weight"), s) for s in range(3)]
    assert len(set(keys)) == 3
    draws = [uniform_np(k, 0, n) for k in keys]
    for d in draws:
        assert abs(d.mean() - 0.5) < 0.002 and abs((d < 0.1).mean() - 0.1) < 0.002
        counts, _ = np.histogram(d, bins=64, range=(0, 1))
        chi2 = (((counts - n / 64) ** 2) / (n / 64)).sum()
        assert chi2 < 120  # 63 degrees of freedom: p < 1e-6 beyond this
        assert abs(np.corrcoef(d[:-1], d[1:])[0, 1]) < 0.01  # neighbours
    assert abs(np.corrcoef(draws[0], draws[1])[0, 1]) < 0.01  # two models' masks
    other_seed = uniform_np(stream_key(tensor_seed(8, "x"), 0), 0, n)
    assert abs(np.corrcoef(draws[0], other_seed)[0, 1]) < 0.01


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
def test_masks_do_not_depend_on_chunks_or_threads(monkeypatch, name):
    """One tensor merged with 1 and 2 threads, in chunks of 1000, 4096 entries and the default,
    and by the whole-tensor reference: the same bits."""
    m = METHODS[name]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 77, generator=g).to(torch.bfloat16)
    srcs = [(base.float() + 0.01 * torch.randn(300, 77, generator=g)).to(torch.bfloat16)] * 2
    params = [{"weight": 0.7, "density": 0.3}, {"weight": 0.4, "density": 0.6}]

    def inputs() -> TensorInputs:
        return TensorInputs(
            base, srcs, params, {"lambda": 1.0}, False, Rescale.inverse_density, CounterDraws(9)
        )

    want = merge_tensor(m, inputs())
    for chunk in (1000, 4096, kernels.CHUNK):
        for threads in (1, 2):
            monkeypatch.setattr(kernels, "CHUNK", chunk)
            ws = Workers(threads)
            out = torch.empty(300, 77)
            merge_tensor_into(m, inputs(), out, ws)
            ws.close()
            assert torch.equal(out.view(torch.int32), want.view(torch.int32)), (chunk, threads)


def test_a_recipe_without_masks_rebuilds_its_old_bits(tmp_path, llama_family):
    """A recipe written before counter masks (no `masks` field) draws with torch's sequential
    generator seeded by (recipe seed, tensor name), model after model, as it always did:
    `torch.rand(shape, generator) < density` per model, the code of every earlier version. The
    counter generator gives other masks."""
    data = recipe_dict(llama_family, "dare_ties")
    recipe = Recipe.parse(data)
    assert recipe.parameter_space.masks == "torch"
    merge_to_dir(recipe, tmp_path / "old")
    got = load_file(tmp_path / "old" / "model.safetensors")
    ps = data["parameter_space"]
    params = ps["groups"][0]["params"]
    base = load_file(llama_family["base"] / "model.safetensors")
    experts = {a: load_file(llama_family[a] / "model.safetensors") for a in params}
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        g = torch.Generator().manual_seed(tensor_seed(ps["seed"], name))
        b = base[name].float()
        thinned = []
        for alias, p in params.items():
            d = experts[alias][name].float() - b
            keep = torch.rand(d.shape, generator=g) < p["density"]  # the sequential draws
            thinned.append(torch.where(keep, d / p["density"], 0.0))
        from evomerge.merge.ops.methods import combine_deltas

        weights = [p["weight"] for p in params.values()]
        want = combine_deltas(
            b, thinned, weights, True, recipe.parameter_space.options_normalize, 1.0
        )
        assert torch.allclose(got[name], want, rtol=0, atol=1e-7), name
    data["parameter_space"]["masks"] = "counter"
    merge_to_dir(Recipe.parse(data), tmp_path / "new")
    new = load_file(tmp_path / "new" / "model.safetensors")
    assert not torch.equal(
        new["model.layers.1.mlp.down_proj.weight"], got["model.layers.1.mlp.down_proj.weight"]
    )


def test_searches_write_counter_masks_and_old_runs_keep_theirs(tmp_path, tiny_zoo):
    """A new search's DARE recipes say `masks: counter`; a run directory from before the field
    existed resumes drawing as it started (torch), also under a config that leaves it unset."""
    from evomerge.search.run.rundir import RunDir
    from evomerge.search.spaces import space_for
    from tests.conftest import search_config

    config = search_config(tiny_zoo, space={"method": "dare_ties", "layers_per_group": 2})
    space = space_for(config)
    assert space.decode(space.x0()).parameter_space.masks == "counter"
    assert all(
        r.parameter_space.masks == "counter"
        for r in space.baselines().values()
        if r.parameter_space.merge_method.random
    )
    run_dir = tmp_path / "run"
    RunDir.create(run_dir, config)
    meta = yaml.safe_load((run_dir / "run.yaml").read_text())
    del meta["config"]["space"]["masks"]  # as written before the field existed
    (run_dir / "run.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    for given_config in (None, config):
        run = RunDir.reopen(run_dir, given_config)
        assert run.config.space.masks == "torch"
        old_space = space_for(run.config)
        assert old_space.decode(old_space.x0()).parameter_space.masks == "torch"
    explicit = config.model_copy(
        update={"space": config.space.model_copy(update={"masks": "counter"})}
    )
    with pytest.raises(Exception, match="space.masks"):
        RunDir.reopen(run_dir, explicit)


def test_counter_masks_refuse_tensors_past_their_positions():
    with pytest.raises(ValueError, match="2\\^32"):
        CounterDraws(0).uniform(((1 << 16) + 1, 1 << 16), "cpu")  # refused before drawing
    with pytest.raises(ValueError, match="2\\^32"):
        CounterDraws(0, offset=(1 << 32) - 10).uniform((11,), "cpu")
    assert masks.MAX_ENTRIES == 1 << 32
