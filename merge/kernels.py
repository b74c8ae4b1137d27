"""Merges written straight into their destination, a chunk at a time, by several threads.

The methods of `merge.methods` and `merge.sparsify` are the reference: whole-tensor torch ops,
each pass over memory allocating a full-size temporary. Here the same operations, in the same
order and on the same fp32 values, run on chunks of `CHUNK` entries whose dozen temporaries are
per-thread scratch buffers that stay in cache and live across tensors and candidates; the last
op writes into the destination (a model parameter, or an output buffer in the recipe's dtype).
Every op is elementwise, so the result is bit-identical to the reference (`tests/test_kernels.py`
checks it on every method and option this module takes).

What is not elementwise is the magnitude cut of TIES and breadcrumbs: keep the k entries of
largest |delta|, ties by lowest flat index (`merge.sparsify`). It is found exactly from a strided
sample (the sample's quantiles bound the cut value; one chunked pass counts the entries above
the upper bound and gathers the few between the bounds; the cut is selected among those), with a
full selection as the fallback when the sample's bounds miss. The cut is a value v and a flat
index c: an entry is kept when |d| > v, or |d| == v at an index below c.

Not here (the reference runs): DELLA (per-row ranks), the L1 rescale (whole-tensor sums), slerp,
and methods registered without a `merge_into`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from evomerge.merge import masks
from evomerge.merge.masks import Generator
from evomerge.merge.parallel import Workers
from evomerge.merge.sparsify import Rescale, _kth_largest

CHUNK = 1 << 17  # entries per chunk: 512 KiB in fp32; a chunk's temporaries stay in cache
SAMPLE_STRIDE = 61  # prime: a row length is never a multiple, so every column is sampled
SAMPLED_FROM = 1 << 18  # entries; a smaller tensor's cut is selected on the whole tensor

F32 = torch.float32


class NonFinite(ArithmeticError):
    """The merge produced NaN or inf."""


def _blocks(n: int) -> int:
    return (n + CHUNK - 1) // CHUNK


# -- the magnitude cut ------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """The first k entries of the ranking (larger |d| first, ties by lower flat index): the
    entries with |d| > v, and those with |d| == v at a flat index below `index`."""

    v: float
    index: int

    def mask(self, a: np.ndarray, lo: int, out: np.ndarray) -> np.ndarray:
        """Which of the entries lo .. lo + len(a) - 1, whose magnitudes are `a`, are kept."""
        v = np.float32(self.v)
        if self.index >= lo + a.size:
            return np.greater_equal(a, v, out=out)
        np.greater(a, v, out=out)
        if self.index > lo:
            head = self.index - lo
            out[:head] |= a[:head] == v
        return out


def exact_cut(a: np.ndarray, k: int) -> Cut:
    """The cut keeping k (1 <= k < n) of the magnitudes `a` (fp32, flat), selected on them all."""
    n = a.size
    v = np.float32(float(_kth_largest(torch.from_numpy(a), k)))
    greater = int(np.count_nonzero(a > v))
    tied = np.flatnonzero(a == v)
    return _cut_from(v, greater, tied, k, n)


def _cut_from(v: np.float32, greater: int, tied: np.ndarray, k: int, n: int) -> Cut:
    keep_tied = k - greater  # 1 .. len(tied): v is the k-th largest
    index = n if keep_tied >= tied.size else int(tied[keep_tied - 1]) + 1
    return Cut(float(v), index)


def rank_cut(
    workers: Workers,
    n: int,
    k: int,
    magnitudes: Callable[[int, int], torch.Tensor],
    sample: Callable[[], np.ndarray],
) -> Cut:
    """The cut keeping k (1 <= k < n) entries of the magnitudes that `magnitudes(lo, hi)` gives
    chunk by chunk (fp32, in a scratch buffer of the calling thread), exactly.

    `sample()` gives the magnitudes at flat indices 0, S, 2S, ... (S = SAMPLE_STRIDE). Its
    quantiles around rank n - k (ascending) bound the cut value with a margin of 4 standard
    deviations of a sampled rank; one pass counts the entries above the upper bound and gathers
    those between the bounds (with their indices), and the cut is selected among them. When
    the bounds miss (the count says the cut lies outside), the whole tensor is selected on."""
    if n < SAMPLED_FROM:
        return exact_cut(magnitudes(0, n).numpy().copy(), k)
    s = sample()
    m = s.size
    centre = (n - k) / SAMPLE_STRIDE
    margin = int(4 * math.sqrt(m)) + 8
    jl = min(m - 1, max(0, int(centre) - margin))
    jh = max(jl, min(m - 1, int(centre) + margin + 1))
    part = np.partition(s, [jl, jh])
    low = float(part[jl]) if jl > 0 else -math.inf
    high = float(part[jh]) if jh < m - 1 else math.inf
    blocks = _blocks(n)
    above = [0] * blocks
    found: list[tuple[np.ndarray, np.ndarray]] = [
        (np.empty(0, np.int64), np.empty(0, np.float32))
    ] * blocks

    def gather(b: int) -> None:
        lo = b * CHUNK
        a = magnitudes(lo, min(n, lo + CHUNK)).numpy()
        above[b] = int(np.count_nonzero(a > high))
        inside = a >= low
        inside &= a <= high
        idx = np.flatnonzero(inside)
        found[b] = (idx + lo, a[idx])

    workers.run(blocks, gather)
    greater_than_high = sum(above)
    values = np.concatenate([f[1] for f in found])
    take = k - greater_than_high  # how many of the candidates are kept, largest first
    if not 1 <= take <= values.size:  # the cut lies outside the sample's bounds: select on all
        full = torch.empty(n, dtype=F32)

        def fill(b: int) -> None:
            lo = b * CHUNK
            hi = min(n, lo + CHUNK)
            full[lo:hi] = magnitudes(lo, hi)

        workers.run(blocks, fill)
        return exact_cut(full.numpy(), k)
    indices = np.concatenate([f[0] for f in found])
    v = np.partition(values, values.size - take)[values.size - take]
    greater = greater_than_high + int(np.count_nonzero(values > v))
    return _cut_from(v, greater, indices[values == v], k, n)


# -- the task-vector family -------------------------------------------------------------------


@dataclass
class Thin:
    """How one model's task vector is thinned, chunk by chunk (`merge.sparsify`'s semantics)."""

    # "all": unchanged; "zero": all dropped; "rank": cut(s); "mask": a given mask; "counter":
    # kept where the counter draw of the entry is below `density` (masks.uniform_np)
    kind: str
    divide: float | None = None  # inverse_density: the kept entries divided by the density
    keep: Cut | None = None  # rank: kept = first `keep` ...
    drop: Cut | None = None  # ... less the first `drop` (breadcrumbs' outliers)
    mask: torch.Tensor | None = None  # mask: a flat bool tensor (DARE's sequential draw)
    key: int = 0  # counter: the stream's key
    density: float = 1.0  # counter

    def apply(self, d: torch.Tensor, lo: int, ws: Workers) -> torch.Tensor:
        """The thinned chunk. Masks multiply, also for TIES, whose reference drops entries with
        `torch.where(keep, d, 0)`: that gives +0 where this gives -0 (a dropped negative entry),
        and no sum, sign election or division downstream tells the two zeros apart, so the
        merge is the same. (A NaN in a task vector is an error here: 0 * NaN is NaN. The
        reference's `where` could drop it unseen.)"""
        if self.kind == "all":
            return d
        n = d.numel()
        t = ws.scratch("t", n)
        if self.kind == "zero":
            return t.zero_()
        keep_f = ws.scratch("keep_f", n)
        if self.kind == "mask":
            assert self.mask is not None
            np.copyto(keep_f.numpy(), self.mask[lo : lo + n].numpy(), casting="unsafe")
        elif self.kind == "counter":  # this chunk's own draws: no whole-tensor mask
            draws = masks.uniform_np(self.key, lo, lo + n)
            np.less(draws, np.float32(self.density), out=ws.scratch("keep", n, torch.bool).numpy())
            np.copyto(keep_f.numpy(), ws.scratch("keep", n, torch.bool).numpy(), casting="unsafe")
        else:
            keep = ws.scratch("keep", n, torch.bool).numpy()
            if self.keep is None and self.drop is None:  # the cut keeps every entry
                keep_f.fill_(1.0)
            else:
                a = torch.abs(d, out=t).numpy()  # t is written only once the masks are made
                if self.keep is None:
                    keep.fill(True)
                else:
                    self.keep.mask(a, lo, keep)
                if self.drop is not None:
                    dropped = self.drop.mask(a, lo, ws.scratch("drop", n, torch.bool).numpy())
                    keep &= ~dropped
                np.copyto(keep_f.numpy(), keep, casting="unsafe")
        torch.mul(d, keep_f, out=t)
        if self.divide is not None:
            t.div_(self.divide)
        return t


def _plan_thin(
    sparsifier: str | None,
    x_params: dict[str, float],
    rescale: Rescale,
    n: int,
    shape: torch.Size,
    generator: Generator | None,
    cut: Callable[[int], Cut],
) -> Thin:
    """The reference's decisions for one model (merge.sparsify), without touching the data
    except through `cut(k)` (the rank cut keeping k) and the random draws, in the reference's
    order."""
    if sparsifier is None:
        return Thin("all")
    density = x_params["density"]
    if density >= 1:
        return Thin("all")
    divide = density if rescale is Rescale.inverse_density else None
    if sparsifier == "magnitude":
        k = max(1, int(density * n))
        if k >= n:  # _top_k keeps everything
            return Thin("all") if rescale is Rescale.none else Thin("rank", divide=divide)
        return Thin("rank", divide=divide, keep=cut(k))
    if sparsifier == "outliers":
        keep = int(density * n)
        if keep == 0:
            return Thin("zero")
        n_top = int(x_params["gamma"] * n)
        n_bottom = max(0, n - keep - n_top)
        first = n - n_bottom - keep
        top = first + keep
        return Thin(
            "rank",
            divide=divide,
            keep=cut(top) if top < n else None,
            drop=cut(first) if first > 0 else None,
        )
    if sparsifier == "random" and isinstance(generator, masks.CounterDraws):
        if n > masks.MAX_ENTRIES:
            raise ValueError(f"a tensor of {n} entries: counter masks take at most 2^32")
        return Thin("counter", divide=divide, key=generator.next_key(), density=density)
    if sparsifier == "random":
        assert isinstance(generator, torch.Generator)
        draws = torch.rand(shape, generator=generator).reshape(-1)  # the reference's draws
        # `draws < density` in NumPy: the same fp32 comparison, without torch's slow bool output
        mask = torch.from_numpy(np.less(draws.numpy(), np.float32(density)))
        return Thin("mask", divide=divide, mask=mask)
    raise ValueError(sparsifier)


def task_vector_into(
    sparsifier: str | None,
    consensus: bool,
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    params: Sequence[dict[str, float]],
    lambda_: float,
    normalize: bool,
    rescale: Rescale,
    generator: Generator | None,
    out: torch.Tensor,
    ws: Workers,
) -> None:
    """base + lambda * mix(w_i * thin(x_i - base)) into `out` (CPU): `registry.task_vector_method`
    and `methods.combine_deltas`, op for op, a chunk at a time."""
    n = out.numel()
    shape = base.shape
    flat_base = base.reshape(-1)
    to_f32 = flat_base.dtype != F32
    flat_out = out.view(-1)
    direct = out.dtype == F32  # the last op writes into the destination itself
    srcs = [s.reshape(-1) for s in sources]

    def base_chunk(lo: int, hi: int) -> torch.Tensor:
        b = flat_base[lo:hi]
        return ws.scratch("b", hi - lo).copy_(b) if to_f32 else b

    def delta_chunk(i: int, lo: int, hi: int, b: torch.Tensor | None) -> torch.Tensor:
        """x_i - base for entries lo .. hi - 1, in fp32 (a bf16 difference is exact there)."""
        if b is None:
            b = base_chunk(lo, hi)
        d = ws.scratch("d", hi - lo)
        src = srcs[i][lo:hi]
        if src.dtype == F32:
            return torch.sub(src, b, out=d)
        return d.copy_(src).sub_(b)  # s.float() - base: a mixed-dtype sub is ~5x slower

    def cutter(i: int) -> Callable[[int], Cut]:
        def magnitudes(lo: int, hi: int) -> torch.Tensor:
            return torch.abs(delta_chunk(i, lo, hi, None), out=ws.scratch("abs", hi - lo))

        def sample() -> np.ndarray:
            stride = SAMPLE_STRIDE
            return (srcs[i][::stride].float() - flat_base[::stride].float()).abs().numpy()

        return lambda k: rank_cut(ws, n, k, magnitudes, sample)

    # a group of the base alone (no models) keeps the base: no thins
    thins = [
        _plan_thin(sparsifier, params[i], rescale, n, shape, generator, cutter(i))
        for i in range(len(srcs))
    ]
    weights = [p["weight"] for p in params]
    total = torch.tensor(list(weights), dtype=F32).sum()
    plain_divisor = total if total.abs() >= 1e-8 else torch.ones(())

    def combine(block: int) -> None:
        lo = block * CHUNK
        hi = min(n, lo + CHUNK)
        L = hi - lo
        b = base_chunk(lo, hi)
        result = flat_out[lo:hi] if direct else ws.scratch("d", L)  # d: free by then
        if not thins:
            result.copy_(b)
        else:
            if consensus:
                xs = []
                for i, thin in enumerate(thins):
                    t = thin.apply(delta_chunk(i, lo, hi, b), lo, ws)
                    xs.append(torch.mul(t, weights[i], out=ws.scratch(f"x{i}", L)))
                mixed = ws.scratch("mixed", L).zero_()
                # methods.combine_deltas op for op; comparisons in NumPy (torch's, with a bool
                # output, run ~20x slower here), their masks as 0/1 floats: x * mask is exact
                signed = ws.scratch("signed", L)
                total_c = signed.copy_(xs[0])
                for x in xs[1:]:
                    total_c += x
                flag = ws.scratch("flag", L, torch.bool).numpy()
                sign = ws.scratch("sign", L)
                np.copyto(sign.numpy(), np.greater_equal(total_c.numpy(), 0, out=flag))
                sign.mul_(2).sub_(1)  # where(total >= 0, 1, -1), exactly
                divisor = ws.scratch("div", L).zero_()
                agree = ws.scratch("agree", L)
                for x, w in zip(xs, weights):
                    torch.mul(x, sign, out=signed)
                    np.copyto(agree.numpy(), np.greater(signed.numpy(), 0, out=flag))
                    mixed.addcmul_(x, agree)
                    divisor.add_(agree, alpha=w)
                # divisor[divisor == 0] = 1: the zeros are +0, and +0 + 1 = 1
                np.add(divisor.numpy(), np.equal(divisor.numpy(), 0, out=flag), out=divisor.numpy())
                if normalize:
                    mixed /= divisor
            else:
                # the reference sums 0 + x_0 + x_1 + ...; x_0 + x_1 + ... + 0 is the same number
                # (the two differ only where the reference's 0 turns a sum of -0s into +0, and so
                # does the + 0 at the end), one pass fewer
                mixed = ws.scratch("mixed", L)
                for i, thin in enumerate(thins):
                    t = thin.apply(delta_chunk(i, lo, hi, b), lo, ws)
                    if i == 0:
                        torch.mul(t, weights[i], out=mixed)
                    else:
                        mixed += torch.mul(t, weights[i], out=ws.scratch("x", L))
                mixed += 0.0
                if normalize:
                    mixed /= plain_divisor
            if lambda_ != 1:
                mixed *= lambda_
            torch.add(b, mixed, out=result)
        if not np.isfinite(result.numpy()).all():
            raise NonFinite
        if not direct:
            flat_out[lo:hi].copy_(result)

    ws.run(_blocks(n), combine)


def linear_into(
    sources: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool,
    out: torch.Tensor,
    ws: Workers,
) -> None:
    """`methods.linear` into `out`, a chunk at a time."""
    w = torch.tensor(list(weights), dtype=F32)
    coefficients = list(w)
    w_sum = w.sum()
    srcs = [s.reshape(-1) for s in sources]
    n = out.numel()
    flat_out = out.view(-1)
    direct = out.dtype == F32

    def combine(block: int) -> None:
        lo = block * CHUNK
        hi = min(n, lo + CHUNK)
        L = hi - lo
        acc = (flat_out[lo:hi] if direct else ws.scratch("res", L)).zero_()
        for s, c in zip(srcs, coefficients):
            x = s[lo:hi]
            if x.dtype != F32:
                x = ws.scratch("x", L).copy_(x)
            acc.addcmul_(x, c)
        if normalize:
            acc.div_(w_sum)
        if not np.isfinite(acc.numpy()).all():
            raise NonFinite
        if not direct:
            flat_out[lo:hi].copy_(acc)

    ws.run(_blocks(n), combine)


def copy_into(source: torch.Tensor, out: torch.Tensor, ws: Workers) -> None:
    """`source.float()` into `out` (passthrough), checked finite, a chunk at a time."""
    src = source.reshape(-1)
    flat_out = out.view(-1)
    n = out.numel()

    def copy(block: int) -> None:
        lo = block * CHUNK
        hi = min(n, lo + CHUNK)
        x = src[lo:hi]
        if not bool(torch.isfinite(x).all()):  # any dtype (NumPy has no bfloat16)
            raise NonFinite
        flat_out[lo:hi].copy_(x)

    ws.run(_blocks(n), copy)
