"""The fused TIES path (merge.fused, used on CUDA) against the reference, run on a CPU: eager
always, compiled by torch.compile where a compiler is available (slow: ~40 s to compile)."""

from __future__ import annotations

import pytest
import torch

from evomerge.merge.ops import fused
from evomerge.merge.ops.registry import METHODS, TensorInputs, merge_tensor, values
from evomerge.merge.ops.sparsify import Rescale

CASES = [  # shape, density, normalize, lambda, task vectors of few values (ties at the cut)
    ((300, 200), 0.5, True, 1.0, False),
    ((64, 33), 0.1, False, 1.3, True),
    ((50, 50), 1.0, True, 0.7, True),
    ((40, 25), 0.999, True, 1.0, True),
]


def _case(shape, density, normalize, lam, ties, dtype):
    m = METHODS["ties"]
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g)
    if ties:
        noise = [0.01 * torch.randint(-3, 4, shape, generator=g).float() for _ in range(3)]
    else:
        noise = [0.01 * torch.randn(shape, generator=g) for _ in range(3)]
    srcs = [(base + e).to(dtype) for e in noise]
    base = base.to(dtype)
    params = [values(m.model_params, {"weight": w, "density": density}) for w in (0.6, -0.3, 0.5)]
    ref = merge_tensor(
        m, TensorInputs(base, srcs, params, {"lambda": lam}, normalize, Rescale.none)
    )
    return base, srcs, params, ref


def _check(compile: bool) -> None:
    for shape, density, normalize, lam, ties in CASES:
        for dtype in (torch.float32, torch.bfloat16):  # sources as stored
            base, srcs, params, ref = _case(shape, density, normalize, lam, ties, dtype)
            out = torch.full(shape, 7.0)
            x = TensorInputs(base, srcs, params, {"lambda": lam}, normalize)
            assert fused.ties_into(x, out, compile=compile)
            assert torch.equal(out, ref), (shape, density, normalize, dtype)


def test_fused_ties_eager_is_the_reference():
    _check(compile=False)


@pytest.mark.slow
def test_fused_ties_compiled_is_the_reference():
    """torch.compile's CPU code (inductor, C++) gives the reference's bits too."""
    try:
        torch.compile(lambda x: x + 1)(torch.zeros(3))
    except Exception as e:  # noqa: BLE001 - no C++ compiler: nothing to compare
        pytest.skip(f"torch.compile cannot run here: {e}")
    fused._compiled.clear()
    _check(compile=True)
    assert fused._compiled["fn"] is not fused.combine


def test_device_cut_keeps_exactly_k_lowest_index_first():
    """The cut the fused path selects on a torch tensor, applied as its compiled code applies it."""
    from evomerge.merge.ops import selection

    a = (torch.arange(1000) % 7).float()  # heavy ties
    for k in (1, 100, 571, 999):
        cut = selection.exact_cut(a, k)
        keep = selection.keeps(a, torch.tensor(cut.v), torch.tensor(cut.index), torch.arange(1000))
        assert int(keep.sum()) == k
        assert torch.equal(keep, selection.top_k(a, k))


def test_a_compiler_that_fails_on_first_call_falls_back_to_eager(monkeypatch):
    """torch.compile compiles lazily: a missing compiler raises on the first call, not at
    torch.compile. Then TIES runs eagerly, with the reference's bits, from then on."""

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(fused._compiled, "fn", broken)
    with pytest.warns(UserWarning, match="TIES runs eagerly"):
        _check(compile=True)
    assert fused._compiled["fn"] is fused.combine


@pytest.mark.parametrize(
    "name", [n for n, m in METHODS.items() if m.elementwise]
)  # linear, passthrough, task arithmetic, DARE
def test_chunked_off_cpu_path_is_the_reference_bit_for_bit(name):
    """What a GPU runs for the elementwise methods (the reference a chunk at a time, counter
    draws from each chunk's first entry), run here on CPU tensors: the reference's bits, on
    bf16 sources, for chunk sizes that do and do not divide the tensor."""
    from evomerge.merge.ops.masks import CounterDraws
    from evomerge.merge.ops.registry import chunkable

    m = METHODS[name]
    g = torch.Generator().manual_seed(4)
    base = torch.randn(91, 57, generator=g).to(torch.bfloat16)
    srcs = [
        (base.float() + 0.02 * torch.randn(91, 57, generator=g)).to(torch.bfloat16)
        for _ in range(3)
    ]
    given_ = [{"weight": w, "density": d} for w, d in ((0.6, 0.3), (-0.3, 0.8), (0.5, 0.5))]
    params = [values(m.model_params, p) for p in given_]
    if m.max_models == 1:
        srcs, params = srcs[:1], params[:1]
    for normalize, rescale in [(False, Rescale.none), (True, Rescale.inverse_density)]:

        def make(normalize=normalize, rescale=rescale) -> TensorInputs:
            return TensorInputs(
                base if m.needs_base else None,
                srcs,
                params,
                values(m.group_params, {"lambda": 1.3}),
                normalize,
                rescale if "rescale" in m.options else Rescale.none,
                CounterDraws(21) if m.random else None,
            )

        assert chunkable(m, make())
        want = merge_tensor(m, make())
        for chunk in (1000, 91 * 57, 1 << 20):
            out = torch.full((91, 57), 7.0)
            fused.chunked_into(m.merge, make(), out, chunk=chunk)
            assert torch.equal(out.view(torch.int32), want.view(torch.int32)), (chunk, normalize)
