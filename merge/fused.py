"""TIES on a GPU as one fused pass: the magnitude masks, the sign election and the combination
compiled together with torch.compile, behind the same `merge_into` interface as merge.kernels.

On a CPU the chunked kernels (merge.kernels) keep a tensor's temporaries in cache; on a GPU the
reference's dozen whole-tensor passes, each a kernel launch reading and writing the tensor, are
what costs. Compiled, the combination reads the base and the task vectors once and writes the
result once. The magnitude cuts (a value v and a flat index c per model, as in merge.kernels)
are selected before, on the device, by the reference's radix select. Used only on CUDA; eager
where compilation fails. `combine` is also the eager definition the compiled one is checked
against (tests/test_fused.py runs both on a CPU)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence

import torch

from evomerge.merge.kernels import NonFinite
from evomerge.merge.masks import CounterDraws
from evomerge.merge.sparsify import _kth_largest

F32 = torch.float32


def combine(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    v: torch.Tensor,
    cut: torch.Tensor,
    weights: torch.Tensor,
    lambda_: torch.Tensor,
    keep_all: tuple[bool, ...],
    normalize: bool,
) -> torch.Tensor:
    """methods.combine_deltas(base, [where(keep_i, d_i, 0)], weights, consensus=True, ...) for
    flat fp32 tensors, where keep_i is |d_i| > v[i], or |d_i| == v[i] at an index below cut[i]
    (every entry where keep_all[i]). Every op is the reference's, elementwise."""
    idx = torch.arange(base.numel(), device=base.device)
    xs = []
    for i, d in enumerate(deltas):
        if keep_all[i]:
            t = d
        else:
            a = d.abs()
            keep = (a > v[i]) | ((a == v[i]) & (idx < cut[i]))
            t = torch.where(keep, d, 0.0)
        xs.append(t * weights[i])
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    sign = torch.where(total >= 0, 1.0, -1.0)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for i, x in enumerate(xs):
        agree = (x * sign > 0).to(F32)
        mixed = mixed + x * agree  # x * agree is exact: a fused multiply-add rounds the same
        divisor = divisor + agree * weights[i]
    divisor = torch.where(divisor == 0, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    mixed = mixed * lambda_
    return base + mixed


_compiled: dict[str, Callable] = {}


def compiled_combine() -> Callable:
    """`combine` through torch.compile (once per process); `combine` itself where it fails."""
    if "fn" not in _compiled:
        try:
            _compiled["fn"] = torch.compile(combine, dynamic=True)
        except Exception as e:  # noqa: BLE001 - no compiler here: eager is correct, only slower
            _eager(e)
    return _compiled["fn"]


def _eager(e: Exception) -> None:
    warnings.warn(f"torch.compile unavailable ({e}); TIES runs eagerly", stacklevel=3)
    _compiled["fn"] = combine


def combine_compiled(*args) -> torch.Tensor:
    """`combine`, compiled where a compiler works. torch.compile compiles on the first call, so
    a missing compiler (no Triton, no C++ toolchain) shows only there: then every later call
    runs eagerly (the same bits), instead of failing every candidate's merge."""
    fn = compiled_combine()
    if fn is combine:
        return combine(*args)
    try:
        return fn(*args)
    except torch.cuda.OutOfMemoryError:
        raise  # eager needs more memory still
    except Exception as e:  # noqa: BLE001 - a compiler failure: eager is correct, only slower
        _eager(e)
        return combine(*args)


GPU_CHUNK = 1 << 24  # entries a chunk: its fp32 temporaries are tens of MB, not a tensor's GBs


def chunked_into(merge: Callable, x, out: torch.Tensor, chunk: int | None = None) -> None:
    """`merge` (an elementwise method's reference: registry.Method.elementwise) over chunks of
    the flat inputs, each result written into its slice of `out`: the reference's bits, with
    the temporaries of one chunk instead of a dozen of the whole tensor (on a 70B embedding,
    25 GB). A random method's counter draws start at the chunk's first entry."""
    chunk = chunk or GPU_CHUNK
    n = out.numel()
    flat_out = out.view(-1)
    base = x.base.reshape(-1) if x.base is not None else None
    sources = [s.reshape(-1) for s in x.sources]
    g = x.generator
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        part = dataclasses.replace(
            x,
            base=None if base is None else base[lo:hi],
            sources=[s[lo:hi] for s in sources],
            generator=None if g is None else CounterDraws(g.seed, lo),
        )
        merged = merge(part)
        if not bool(torch.isfinite(merged).all()):
            raise NonFinite
        flat_out[lo:hi].copy_(merged.reshape(-1))


def device_cut(a: torch.Tensor, k: int) -> tuple[float, int]:
    """(v, c) keeping the first k (1 <= k < n) entries of the flat magnitudes `a`, on their
    device: sparsify._kth_largest for v, then the tied entries' indices only where needed."""
    n = a.numel()
    v = float(_kth_largest(a, k))
    greater = int(torch.count_nonzero(a > v))
    tied = int(torch.count_nonzero(a == v))
    keep_tied = k - greater
    if keep_tied >= tied:
        return v, n
    positions = torch.nonzero(a == v).squeeze(1)
    return v, int(positions[keep_tied - 1]) + 1


def ties_into(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    params: Sequence[dict[str, float]],
    lambda_: float,
    normalize: bool,
    out: torch.Tensor,
    compile: bool = True,
) -> bool:
    """TIES (magnitude sparsifier, sign consensus, no rescale) into `out`, fused; False where
    nothing is merged (the reference handles a group of the base alone)."""
    flat_base = base.reshape(-1).float()
    n = flat_base.numel()
    ds = [s.reshape(-1).float() - flat_base for s in sources]
    if not ds:
        return False
    vs, cuts, keep_all = [], [], []
    for d, p in zip(ds, params):
        density = p["density"]
        k = max(1, int(density * n))
        everything = density >= 1 or k >= n
        keep_all.append(everything)
        v, c = (0.0, n) if everything else device_cut(d.abs(), k)
        vs.append(v)
        cuts.append(c)
    dev = flat_base.device
    fn = combine_compiled if compile else combine
    merged = fn(
        flat_base,
        ds,
        torch.tensor(vs, dtype=F32, device=dev),
        torch.tensor(cuts, dtype=torch.int64, device=dev),
        torch.tensor([p["weight"] for p in params], dtype=F32, device=dev),
        torch.tensor(lambda_, dtype=F32, device=dev),
        tuple(keep_all),
        normalize,
    )
    if not bool(torch.isfinite(merged).all()):
        raise NonFinite
    out.view(-1).copy_(merged)
    return True
