"""merge.selection is the one selection rule: the reference (merge.sparsify), the chunked CPU
kernels (merge.kernels) and the fused path (merge.fused, run eagerly on a CPU) keep the same
entries of bf16 task vectors full of exact ties, and each follows the module when its rule is
swapped, so none keeps a copy of its own."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from evomerge.merge.engine import output_dtype
from evomerge.merge.ops import fused, selection
from evomerge.merge.ops.registry import METHODS, TensorInputs, merge_tensor, merge_tensor_into
from evomerge.merge.parallel import Workers
from tests import test_kernels

SHAPE = (96, 70)  # 6720 entries: several chunks, and the sampled cut, under `small_chunks`
small_chunks, workers = test_kernels.small_chunks, test_kernels.workers  # its fixtures


def _inputs(method: str, density: float, seed: int) -> TensorInputs:
    """One bf16 model over a bf16 base: every delta is +-0.125, 0.25 or 0.375 (exact in bf16
    and in their fp32 difference), so each cut falls inside a run of thousands of ties."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-8, 9, SHAPE, generator=g) * 0.25
    sign = torch.where(torch.rand(SHAPE, generator=g) < 0.5, -1.0, 1.0)
    delta = torch.randint(1, 4, SHAPE, generator=g) * 0.125 * sign
    params = [{"weight": 1.0, "density": density, "gamma": 0.1}]
    return TensorInputs(
        base.to(torch.bfloat16), [(base + delta).to(torch.bfloat16)], params, {"lambda": 1.0}
    )


def _kept(x: TensorInputs, out: torch.Tensor) -> torch.Tensor:
    """One model of weight 1, lambda 1, no normalizing: a kept entry is the source, a dropped
    one the base (the deltas are never 0)."""
    assert x.base is not None
    return out != x.base.float()


def _paths(method: str, x: TensorInputs, ws: Workers) -> dict[str, torch.Tensor]:
    m = METHODS[method]
    masks = {"reference": _kept(x, merge_tensor(m, x))}
    out = torch.empty(SHAPE)
    merge_tensor_into(m, x, out, ws)  # on a CPU: merge.kernels
    masks["kernels"] = _kept(x, out)
    if method == "ties":
        out = torch.empty(SHAPE)
        assert fused.ties_into(x, out, compile=False)
        masks["fused"] = _kept(x, out)
    return masks


def _ranking_mask(x: TensorInputs, start: int, stop: int) -> torch.Tensor:
    """Ranks start .. stop - 1 of larger |d| first, ties by lower flat index: a stable sort."""
    assert x.base is not None
    d = (x.sources[0].float() - x.base.float()).reshape(-1)
    order = torch.sort(-d.abs(), stable=True).indices
    mask = torch.zeros(d.numel(), dtype=torch.bool)
    mask[order[start:stop]] = True
    return mask.reshape(SHAPE)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.77])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_every_path_keeps_the_same_entries(small_chunks, workers, method, density):
    x = _inputs(method, density, seed=int(density * 100))
    n = SHAPE[0] * SHAPE[1]
    if method == "ties":
        start, stop = 0, max(1, int(density * n))
    else:  # breadcrumbs: int(density * n) after the int(gamma * n) largest
        keep = int(density * n)
        start = n - max(0, n - keep - int(0.1 * n)) - keep
        stop = start + keep
    want = _ranking_mask(x, start, stop)
    for path, got in _paths(method, x, workers).items():
        assert int(got.sum()) == stop - start, path
        assert torch.equal(got, want), path


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_every_path_follows_the_module_when_its_rule_changes(
    small_chunks, workers, monkeypatch, method
):
    """Swap selection's count (two entries fewer) and its tie-break (no tied entry kept):
    every path changes with it, the same way."""
    x = _inputs(method, 0.5, seed=5)
    before = _paths(method, x, workers)
    ranks_of = {"ties": "magnitude_ranks", "breadcrumbs": "outlier_ranks"}[method]
    real = getattr(selection, ranks_of)

    def fewer(*args):
        r = real(*args)
        return r if r is None else dataclasses.replace(r, stop=r.stop - 2)

    monkeypatch.setattr(selection, ranks_of, fewer)
    for path, got in _paths(method, x, workers).items():
        assert int(got.sum()) == int(before[path].sum()) - 2, path
        assert not (got & ~before[path]).any(), path
    monkeypatch.setattr(selection, ranks_of, real)

    def no_ties(v, at_or_above, k, n, tied):
        return selection.Cut(float(v), 0)

    monkeypatch.setattr(selection, "tie_break", no_ties)
    after = _paths(method, x, workers)
    assert not torch.equal(after["reference"], before["reference"])
    for path, got in after.items():
        assert torch.equal(got, after["reference"]), path


def test_output_dtype_is_the_recipes_for_floats_and_the_stored_one_else():
    recipe = SimpleNamespace(dtype="bfloat16")
    assert output_dtype(recipe, torch.float32) is torch.bfloat16  # type: ignore[arg-type]
    assert output_dtype(recipe, torch.float16) is torch.bfloat16  # type: ignore[arg-type]
    assert output_dtype(recipe, torch.int64) is torch.int64  # type: ignore[arg-type]
    assert output_dtype(recipe, torch.bool) is torch.bool  # type: ignore[arg-type]


def test_tensor_inputs_are_frozen():
    x = _inputs("ties", 0.5, seed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        x.normalize = True  # type: ignore[misc]
