"""Merge methods: hand-computed examples, properties, and agreement with mergekit 0.1.5."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.merge.errors import EvomergeError
from evomerge.merge.ops import methods, sparsify
from evomerge.merge.ops.registry import (
    MAGNITUDE,
    METHODS,
    TensorInputs,
    get_method,
    merge_tensor,
    task_vector_method,
)
from evomerge.merge.ops.sparsify import Rescale

DETERMINISTIC_TA = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties"]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def P(weight=1.0, density=1.0, gamma=0.01, epsilon=0.15) -> dict:
    """One model's parameters (every name a method of the registry may read)."""
    return {"weight": weight, "density": density, "gamma": gamma, "epsilon": epsilon}


def _run(name, base, sources, params, normalize=None, rescale=None, method=None, **group):
    m = method or get_method(name)
    inputs = TensorInputs(
        base=base,
        sources=sources,
        params=[{p.name: given[p.name] for p in m.model_params} for given in params],
        group={p.name: group.get(p.name, p.default) for p in m.group_params},
        normalize=m.default_normalize if normalize is None else normalize,
        rescale=rescale or m.default_rescale,
        generator=_gen(1),
    )
    return merge_tensor(m, inputs)


# -- hand-computed examples -----------------------------------------------------------------


def test_linear_by_hand():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    out = _run("linear", None, [a, b], [P(1.0), P(3.0)])
    assert torch.allclose(out, torch.tensor([2.5, -1.0]))
    out = _run("linear", None, [a, b], [P(1.0), P(3.0)], normalize=False)
    assert torch.allclose(out, torch.tensor([10.0, -4.0]))


def test_slerp_by_hand_orthogonal():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = methods.slerp(a, b, 0.5)
    assert torch.allclose(out, torch.tensor([2**-0.5, 2**-0.5]))
    assert torch.equal(methods.slerp(a, b, 0.0), a)


def test_slerp_collinear_is_lerp():
    a = torch.tensor([1.0, 2.0])
    assert torch.allclose(methods.slerp(a, 3 * a, 0.25), 1.5 * a)


def test_task_arithmetic_by_hand():
    base = torch.tensor([1.0, 1.0, 1.0])
    x1, x2 = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 3.0, -1.0])
    out = _run("task_arithmetic", base, [x1, x2], [P(1.0), P(0.5)], **{"lambda": 2.0})
    # d1 = [1, -1, 0], d2 = [0, 2, -2]; mix = [1, 0, -1]; *2 + base
    assert torch.allclose(out, torch.tensor([3.0, 1.0, -1.0]))


def test_ties_by_hand():
    base = torch.zeros(4)
    x1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    x2 = torch.tensor([-1.0, -2.0, 4.0, 1.0])
    p = [P(1.0, 0.5), P(1.0, 0.5)]
    out = _run("ties", base, [x1, x2], p)
    # top-2 by magnitude: d1 -> [3, 0, 0, 2], d2 -> [0, -2, 4, 0]; every entry has one voter
    assert torch.allclose(out, torch.tensor([3.0, -2.0, 4.0, 2.0]))
    x2 = torch.tensor([-4.0, 1.0, 0.0, 3.0])  # d2 -> [-4, 0, 0, 3]: entry 0 elects "-"
    out = _run("ties", base, [x1, x2], p)
    assert torch.allclose(out, torch.tensor([-4.0, 0.0, 0.0, 2.5]))


def test_breadcrumbs_drops_outliers_and_small():
    d = torch.arange(1.0, 11.0)  # magnitudes 1..10
    out = sparsify.magnitude_outliers(d, density=0.5, gamma=0.2)
    # drop top 2 (9, 10) and bottom 3 (1..3): keep 4..8
    assert torch.equal(out != 0, (d >= 4) & (d <= 8))


def test_dare_keeps_expected_fraction_and_rescales():
    d = torch.ones(200_000)
    out = sparsify.random(d, 0.3, _gen(), Rescale.inverse_density)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / 0.3))
    out_l1 = sparsify.random(d * torch.linspace(0.1, 1, 200_000), 0.3, _gen(), Rescale.l1)
    assert out_l1.abs().sum().item() == pytest.approx(
        (d * torch.linspace(0.1, 1, 200_000)).sum().item(), rel=1e-4
    )


def test_dare_same_seed_same_mask_other_seed_other_mask():
    d = torch.randn(1000, generator=_gen(5))
    a = sparsify.random(d, 0.5, _gen(9))
    assert torch.equal(a, sparsify.random(d, 0.5, _gen(9)))
    assert not torch.equal(a, sparsify.random(d, 0.5, _gen(10)))


def test_della_keeps_large_entries_more_often():
    d = torch.linspace(0.01, 1, 1000).repeat(200, 1)  # magnitude rises along each row
    out = sparsify.della_magprune(d, density=0.5, epsilon=0.4, generator=_gen())
    keep = (out != 0).float().mean(dim=0)
    assert keep[:100].mean() < 0.2 and keep[-100:].mean() > 0.8
    assert abs((out != 0).float().mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match="epsilon"):
        sparsify.della_magprune(d, density=0.9, epsilon=0.2, generator=_gen())


def test_passthrough_copies_the_source():
    x = torch.randn(5)
    assert torch.equal(_run("passthrough", None, [x], [P()]), x)


def test_unknown_method_suggests():
    with pytest.raises(EvomergeError, match="did you mean 'ties'"):
        get_method("tiess")


# -- properties -----------------------------------------------------------------------------

shapes = st.sampled_from([(7,), (3, 5), (4, 2, 3)])
weights = st.floats(0.1, 2.0)


def _tensors(shape, n, seed):
    g = _gen(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(METHODS)), shape=shapes, seed=st.integers(0, 10**6))
def test_equal_inputs_give_the_input_back(name, shape, seed):
    (x,) = _tensors(shape, 1, seed)
    n = 1 if name in ("slerp", "passthrough") else 2
    m = get_method(name)
    params = [P(0.7, 0.9, 0.01, 0.05)] * n
    out = _run(
        name,
        x.clone() if m.needs_base else None,
        [x.clone() for _ in range(n)],
        params,
        normalize=True,
    )
    assert torch.allclose(out, x, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    name=st.sampled_from(["linear", *DETERMINISTIC_TA]),
    shape=shapes,
    seed=st.integers(0, 10**6),
    w=st.lists(weights, min_size=3, max_size=3),
)
def test_permuting_models_with_their_params_changes_nothing(name, shape, seed, w):
    base, *xs = _tensors(shape, 4, seed)
    params = [P(wi, 0.6, 0.1) for wi in w]
    out = _run(name, base, xs, params)
    perm = [2, 0, 1]
    out_p = _run(name, base, [xs[i] for i in perm], [params[i] for i in perm])
    assert torch.allclose(out, out_p, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10**6))
def test_slerp_at_zero_is_base(shape, seed):
    base, other = _tensors(shape, 2, seed)
    assert torch.allclose(_run("slerp", base, [other], [P()], t=0.0), base)


@settings(max_examples=20, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10**6), w=st.lists(weights, min_size=2, max_size=2))
def test_ties_at_density_one_without_consensus_is_task_arithmetic(shape, seed, w):
    base, *xs = _tensors(shape, 3, seed)
    params = [P(wi, 1.0) for wi in w]
    no_consensus = task_vector_method("ties_without_consensus", "", MAGNITUDE)
    assert torch.allclose(
        _run("", base, xs, params, normalize=False, method=no_consensus),
        _run("task_arithmetic", base, xs, params, normalize=False),
        atol=1e-6,
    )


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(METHODS)), shape=shapes, seed=st.integers(0, 10**6))
def test_shapes_kept_and_fp32_out(name, shape, seed):
    base, a, b = (t.to(torch.bfloat16) for t in _tensors(shape, 3, seed))
    m = get_method(name)
    sources = [a] if name in ("slerp", "passthrough") else [a, b]
    params = [P(0.5, 0.5, 0.01, 0.1)] * len(sources)
    out = _run(name, base if m.needs_base else None, sources, params)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


# -- mergekit 0.1.5 as the reference ----------------------------------------------------------


def _ulp_distance(x: torch.Tensor, y: torch.Tensor) -> int:
    """Largest distance in units in the last place between two tensors of one float dtype."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    a, b = x.view(bits[x.dtype]).long(), y.view(bits[y.dtype]).long()
    return int((a - b).abs().max())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["linear", "slerp", *DETERMINISTIC_TA])
@pytest.mark.parametrize("normalize", [True, False])
def test_agrees_with_mergekit(name, out_dtype, normalize):
    from mergekit.merge_methods.api import merge_tensors

    g = _gen(11)
    base = torch.randn(96, 80, generator=g)
    xs = [base + 0.05 * torch.randn(96, 80, generator=g) for _ in range(3)]
    w, dens = [0.6, 0.3, 0.5], [0.4, 0.7, 0.9]
    m = get_method(name)
    if name == "slerp":
        ref = merge_tensors(
            [base, xs[0]],
            "slerp",
            parameters={"t": 0.3},
            base_index=0,
            dtype=torch.float32,
            out_dtype=out_dtype,
        )
        ours = _run("slerp", base, [xs[0]], [P()], t=0.3)
    elif name == "linear":
        ref = merge_tensors(
            xs,
            "linear",
            parameters={"weight": w, "normalize": normalize},
            dtype=torch.float32,
            out_dtype=out_dtype,
        )
        ours = _run("linear", None, xs, [P(wi) for wi in w], normalize=normalize)
    else:
        ids = [0, 1, 2, 3]
        per = {"weight": dict(zip(ids[1:], w)), "density": dict(zip(ids[1:], dens))}
        if "breadcrumbs" in name:
            per["gamma"] = dict.fromkeys(ids[1:], 0.05)
        ref = merge_tensors(
            [base, *xs],
            name,
            ids=ids,
            base_index=0,
            dtype=torch.float32,
            out_dtype=out_dtype,
            parameters={**per, "normalize": normalize, "lambda": 0.8},
        )
        params = [P(wi, di, 0.05) for wi, di in zip(w, dens)]
        ours = _run(name, base, xs, params, normalize=normalize, **{"lambda": 0.8})
    assert m.name == name
    assert _ulp_distance(ours.to(out_dtype), ref.to(out_dtype)) <= 1


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 1e-30, 0.5, 0.5, 1.0, 3.0, 1e30]), min_size=1, max_size=300),
    st.data(),
)
def test_kth_smallest_is_exact_with_ties_and_zeros(values, data):
    from evomerge.merge.ops.selection import kth_smallest

    v = torch.tensor(values) * torch.rand(len(values)).round()  # more zeros and ties
    k = data.draw(st.integers(1, len(values)))
    assert kth_smallest(v, k) == torch.sort(v).values[k - 1]


@pytest.mark.parametrize("k", [1, 12345, (1 << 20) + 7])
def test_kth_smallest_radix_path_is_exact(k):
    """Above the size where the radix select takes over (2^20 entries, any device)."""
    from evomerge.merge.ops.selection import _RADIX_FROM, kth_smallest

    g = torch.Generator().manual_seed(k)
    v = (torch.randn(_RADIX_FROM + 7, generator=g).abs() * 4).round() / 4  # many ties
    assert kth_smallest(v, k) == torch.kthvalue(v, k).values
