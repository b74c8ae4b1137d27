"""The chunked, in-place merge (merge.kernels) against the reference, bit for bit; its threads."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.merge import parallel
from evomerge.merge.errors import EvomergeError
from evomerge.merge.io.pipeline import ReadAhead, WriteBehind
from evomerge.merge.ops import kernels, selection
from evomerge.merge.ops.masks import CounterDraws
from evomerge.merge.ops.registry import (
    METHODS,
    Method,
    TensorInputs,
    merge_tensor,
    merge_tensor_into,
    values,
)
from evomerge.merge.ops.sparsify import Rescale
from evomerge.merge.parallel import Workers, merge_threads


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 1000 entries and the sampled cut from 4096: every path on small tensors."""
    monkeypatch.setattr(kernels, "CHUNK", 1000)
    monkeypatch.setattr(selection, "SAMPLED_FROM", 4096)


@pytest.fixture(scope="module")
def workers():
    w = Workers(2)
    yield w
    w.close()


def _inputs(name, shape, dtype, density, rescale, normalize, lam, seed, ties, counter=False):
    m = METHODS[name]
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if ties:  # task vectors of few distinct values: many entries tie at the cut
        noise = [0.01 * torch.randint(-3, 4, shape, generator=g).float() for _ in range(3)]
    else:
        noise = [0.01 * torch.randn(shape, generator=g) for _ in range(3)]
    srcs = [(base + e).to(dtype) for e in noise]
    base = base.to(dtype)
    given_ = [
        {"weight": w, "density": density, "gamma": 0.03, "epsilon": 0.05} for w in (0.6, -0.3, 0.5)
    ]
    params = [values(m.model_params, p) for p in given_]
    if name == "passthrough":
        srcs, params = srcs[:1], params[:1]

    def make():
        return TensorInputs(
            base=base if m.needs_base else None,
            sources=srcs,
            params=params,
            group=values(m.group_params, {"lambda": lam, "t": 0.3}),
            normalize=normalize,
            rescale=rescale,
            generator=(CounterDraws(5) if counter else torch.Generator().manual_seed(5))
            if m.random
            else None,
        )

    return m, make


def _same(out: torch.Tensor, ref: torch.Tensor) -> bool:
    as_int = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
    return torch.equal(out.view(as_int[out.dtype]), ref.reshape(out.shape).view(as_int[ref.dtype]))


# DELLA has a `merge_into` (the task-vector family's) that declines: its ranks are per row
CHUNKED = [n for n, m in METHODS.items() if m.merge_into is not None and "della" not in n]


@pytest.mark.parametrize(
    "name,counter",  # random methods with either generator's masks
    [(n, False) for n in CHUNKED] + [(n, True) for n in CHUNKED if METHODS[n].random],
)
@pytest.mark.parametrize(
    "dtype,out_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),  # bf16-resident sources, an fp32 candidate
        (torch.float32, torch.bfloat16),
    ],
)
def test_chunked_merge_is_the_reference_bit_for_bit(
    small_chunks, workers, name, dtype, out_dtype, counter
):
    """Every method with a chunked path, over densities (sampled and whole-tensor cuts, k = n),
    rescales, normalize and lambda, with and without ties at the cut, random masks from either
    generator (counter draws made per chunk in the kernel, for the whole tensor in the
    reference): the same bits."""
    cases = itertools.product(
        [(7, 13), (96, 100)],  # one chunk; 10 chunks, sampled cut
        [0.5, 0.05, 0.9999, 1.0],
        [Rescale.none, Rescale.inverse_density],
        [(False, 1.0), (True, 1.3)],
        [False, True],
    )
    for shape, density, rescale, (normalize, lam), ties in cases:
        m, make = _inputs(name, shape, dtype, density, rescale, normalize, lam, 1, ties, counter)
        ref = merge_tensor(m, make()).to(out_dtype)
        out = torch.full(shape, 7.0, dtype=out_dtype)
        merge_tensor_into(m, make(), out, workers)
        assert _same(out, ref), (shape, density, rescale, normalize, ties)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_linear", "breadcrumbs"])
def test_signed_zeros_come_out_as_the_reference_gives_them(workers, name):
    """-0 in the base, sources at +-0 and negative weights: sums of -0 are where a reordered
    sum could differ from the reference's in the sign of a zero."""
    m = METHODS[name]
    zeros = torch.tensor([-0.0, 0.0, -0.0, 0.0, 1.0, -0.0] * 50)
    base = zeros.clone()
    srcs = [zeros.clone(), -zeros.clone(), torch.zeros(300)]
    for weights in [(-0.5, -0.25, -1.0), (0.5, -0.5, 0.0), (-0.0, -1.0, 2.0)]:
        params = [values(m.model_params, {"weight": w, "density": 0.9}) for w in weights]
        for normalize in (False, True):

            def make(params=params, normalize=normalize):
                return TensorInputs(
                    base,
                    srcs,
                    params,
                    values(m.group_params, {}),
                    normalize,
                    m.default_rescale,
                    torch.Generator().manual_seed(1) if m.random else None,
                )

            try:
                ref = merge_tensor(m, make())
            except ValueError:
                continue
            out = torch.empty(300)
            merge_tensor_into(m, make(), out, workers)
            assert _same(out, ref), (weights, normalize)


def test_chunked_path_declines_what_it_does_not_compute(workers):
    """The L1 rescale (whole-tensor sums) and DELLA (per-row ranks) run the reference."""
    for name, rescale in [("ties", Rescale.l1), ("della", Rescale.inverse_density)]:
        m, make = _inputs(name, (30, 40), torch.float32, 0.5, rescale, True, 1.0, 2, False)
        assert name != "ties" or m.merge_into(make(), torch.empty(30, 40), workers) is False
        out = torch.empty(30, 40)
        merge_tensor_into(m, make(), out, workers)
        assert _same(out, merge_tensor(m, make()))


def test_non_finite_merge_raises(workers):
    m, make = _inputs("ties", (50, 50), torch.float32, 0.5, Rescale.none, True, 1.0, 3, False)
    x = make()
    x.sources[0][3, 3] = float("inf")
    with pytest.raises(kernels.NonFinite):
        merge_tensor_into(m, x, torch.empty(50, 50), workers)


@settings(max_examples=80, deadline=None)
@given(st.integers(4000, 9000), st.integers(0, 5), st.data())
def test_rank_cut_keeps_exactly_the_first_k(workers, n, distinct, data):
    """The chunked cut's mask is selection.top_k's: exactly k, ties by lowest index; from a good
    sample, and from a sample whose bounds miss (the whole-tensor fallback)."""
    rng = np.random.default_rng(n + distinct)
    if distinct:
        a = rng.integers(0, distinct + 1, n).astype(np.float32) / 4  # few values: ties
    else:
        a = np.abs(rng.standard_normal(n)).astype(np.float32)
    k = data.draw(st.integers(1, n - 1))
    want = selection.top_k(torch.from_numpy(a), k).numpy()
    old = selection.SAMPLED_FROM
    selection.SAMPLED_FROM = 1000
    try:
        for sample in (
            lambda: a[:: selection.SAMPLE_STRIDE].copy(),
            lambda: np.full(5000, -1, np.float32),  # bounds below everything: the fallback
            lambda: np.full(5000, 100, np.float32),  # above everything (fallback if k is small)
            lambda: np.zeros(50, np.float32),
        ):
            chunks = lambda lo, hi: torch.from_numpy(a[lo:hi])  # noqa: E731
            cut = selection.rank_cut(workers, n, k, chunks, sample, 777)
            got = np.concatenate(
                [
                    cut.mask(a[lo : lo + 777], lo, np.empty(len(a[lo : lo + 777]), bool))
                    for lo in range(0, n, 777)
                ]
            )
            assert got.sum() == k
            assert np.array_equal(got, want)
    finally:
        selection.SAMPLED_FROM = old


# -- threads ----------------------------------------------------------------------------------


def test_workers_run_every_block_once_and_raise_the_first_error():
    w = Workers(3)
    seen, lock = [], threading.Lock()

    def record(i):
        assert torch.get_num_threads() == 1  # one intra-op thread in every merging thread
        with lock:
            seen.append(i)

    w.run(50, record)
    assert sorted(seen) == list(range(50))

    def fail(i):
        if i == 7:
            raise ValueError("block 7")

    with pytest.raises(ValueError, match="block 7"):
        w.run(20, fail)
    w.close()


def test_reference_merges_run_single_threaded(workers):
    """Reductions (slerp's norms, the L1 rescale) then give the same bits at any thread count."""
    seen = []

    def merge(x):
        seen.append(torch.get_num_threads())
        return x.sources[0].float()

    m = Method("probe", "", merge, max_models=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = TensorInputs(None, [torch.ones(3)], [{}], {})
        merge_tensor_into(m, x, torch.empty(3), workers)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_merge_threads_follow_the_load_and_the_override(monkeypatch):
    monkeypatch.delenv(parallel.THREADS_ENV, raising=False)
    monkeypatch.setattr(parallel, "available_cpus", lambda: 8)
    monkeypatch.setattr(parallel.os, "getloadavg", lambda: (5.6, 0, 0))
    assert merge_threads() == 2  # 8 CPUs, 5.6 busy
    monkeypatch.setattr(parallel.os, "getloadavg", lambda: (40.0, 0, 0))
    assert merge_threads() == 1
    monkeypatch.setattr(parallel.os, "getloadavg", lambda: (0.2, 0, 0))
    assert merge_threads() == 8
    assert merge_threads(3) == 3
    monkeypatch.setenv(parallel.THREADS_ENV, "5")
    assert merge_threads() == 5
    monkeypatch.setenv(parallel.THREADS_ENV, "many")
    with pytest.raises(EvomergeError, match="EVOMERGE_THREADS"):
        merge_threads()


def test_read_ahead_keeps_order_bounds_memory_and_raises_in_order():
    loaded, lock = [], threading.Lock()

    def load(i):
        with lock:
            loaded.append(i)
        if i == 6:
            raise OSError("disk")
        return i * 10

    got = []
    reader = ReadAhead(range(10), load, lambda i: 100, window=250)
    with reader, pytest.raises(OSError, match="disk"):
        for i, value, release in reader:
            with lock:
                assert max(loaded) <= i + 2  # the window holds 2 items of 100 bytes
            got.append(value)
            release()
    assert got == [0, 10, 20, 30, 40, 50]
    with ReadAhead(range(3), lambda i: i, lambda i: 10**9, window=1) as r:  # bigger than the window
        assert [v for _, v, release in r if not release()] == [0, 1, 2]


def test_write_behind_writes_in_order_and_reports_errors():
    written = []
    w = WriteBehind(written.append, window=10)
    for i in range(20):
        w.submit(i, 4)
    w.finish()
    assert written == list(range(20))

    def fail(item):
        raise OSError(28, "No space left on device")

    w = WriteBehind(fail, window=10)
    w.submit(0, 1)
    with pytest.raises(OSError, match="No space"):
        for i in range(100):
            w.submit(i, 1)
        w.finish()
