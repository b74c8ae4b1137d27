"""CPU merges written into their destination a chunk at a time, by several threads.

The reference's ops (`methods`, `sparsify`) in the same order on the same fp32 values, on chunks
whose temporaries are per-thread scratch: every op is elementwise, so the bits are the
reference's (tests/test_kernels.py). The magnitude cut is not: `selection.rank_cut` finds it
first. Not here (the reference runs): DELLA (per-row ranks), the L1 rescale, slerp.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from evomerge.merge.ops import masks, selection
from evomerge.merge.ops.inputs import TensorInputs
from evomerge.merge.ops.masks import Generator
from evomerge.merge.ops.selection import Cut
from evomerge.merge.ops.sparsify import Rescale
from evomerge.merge.parallel import Workers

CHUNK = 1 << 17  # entries per chunk: 512 KiB in fp32; a chunk's temporaries stay in cache

F32 = torch.float32


class NonFinite(ArithmeticError):
    """The merge produced NaN or inf."""


def _blocks(n: int) -> int:
    return (n + CHUNK - 1) // CHUNK


# -- the task-vector family -------------------------------------------------------------------


@dataclass
class Thin:
    """How one model's task vector is thinned, chunk by chunk (`sparsify`'s semantics)."""

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
    """The reference's decisions for one model, touching the data only through `cut(k)` (the
    rank cut keeping k) and the random draws, taken in the reference's order."""
    if sparsifier is None:
        return Thin("all")
    density = x_params["density"]
    if density >= 1:
        return Thin("all")
    divide = density if rescale is Rescale.inverse_density else None
    if sparsifier in ("magnitude", "outliers"):
        ranks = (
            selection.magnitude_ranks(density, n)
            if sparsifier == "magnitude"
            else selection.outlier_ranks(density, x_params["gamma"], n)
        )
        assert ranks is not None  # density < 1
        if ranks.stop == 0:
            return Thin("zero")
        keep, drop = ranks.cuts(cut)
        if keep is None and drop is None and rescale is Rescale.none:
            return Thin("all")  # d * 1 would be d: skip the pass
        return Thin("rank", divide=divide, keep=keep, drop=drop)
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
    sparsifier: str | None, consensus: bool, x: TensorInputs, out: torch.Tensor, ws: Workers
) -> None:
    """base + lambda * mix(w_i * thin(x_i - base)) into `out` (CPU): `registry.task_vector_method`
    and `methods.combine_deltas`, op for op, a chunk at a time."""
    assert x.base is not None
    base, params, normalize, lambda_ = x.base, x.params, x.normalize, x.group["lambda"]
    n = out.numel()
    shape = base.shape
    flat_base = base.reshape(-1)
    to_f32 = flat_base.dtype != F32
    flat_out = out.view(-1)
    direct = out.dtype == F32  # the last op writes into the destination itself
    srcs = [s.reshape(-1) for s in x.sources]

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
            stride = selection.SAMPLE_STRIDE
            return (srcs[i][::stride].float() - flat_base[::stride].float()).abs().numpy()

        return lambda k: selection.rank_cut(ws, n, k, magnitudes, sample, CHUNK)

    # a group of the base alone (no models) keeps the base: no thins
    thins = [
        _plan_thin(sparsifier, params[i], x.rescale, n, shape, x.generator, cutter(i))
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


def linear_into(x: TensorInputs, out: torch.Tensor, ws: Workers) -> None:
    """`methods.linear` into `out`, a chunk at a time."""
    normalize = x.normalize
    w = torch.tensor([p["weight"] for p in x.params], dtype=F32)
    coefficients = list(w)
    w_sum = w.sum()
    srcs = [s.reshape(-1) for s in x.sources]
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


def copy_into(x: TensorInputs, out: torch.Tensor, ws: Workers) -> None:
    """The first source, `.float()`, into `out` (passthrough), checked finite, a chunk at a time."""
    src = x.sources[0].reshape(-1)
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
