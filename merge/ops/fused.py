"""TIES on CUDA as one torch.compile'd pass (masks, sign election, combination), and chunked
references for other elementwise methods off the CPU.

On a GPU the reference's dozen whole-tensor passes are what cost; compiled, the base and the
task vectors are read once. Eager where compilation fails; `combine` is also the eager
definition the compiled one is checked against (tests/test_fused.py)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import torch

from evomerge.merge.ops import selection
from evomerge.merge.ops.inputs import TensorInputs
from evomerge.merge.ops.kernels import NonFinite
from evomerge.merge.ops.masks import CounterDraws

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
    flat fp32 tensors, where keep_i is the cut (v[i], cut[i]) (`selection.keeps`; every entry
    where keep_all[i]). Every op is the reference's, elementwise."""
    idx = torch.arange(base.numel(), device=base.device)
    xs = []
    for i, d in enumerate(deltas):
        t = d if keep_all[i] else torch.where(selection.keeps(d.abs(), v[i], cut[i], idx), d, 0.0)
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


def chunked_into(
    merge: Callable, x: TensorInputs, out: torch.Tensor, chunk: int | None = None
) -> None:
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
    assert g is None or isinstance(g, CounterDraws)  # registry.chunkable: counter draws only
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


def ties_into(x: TensorInputs, out: torch.Tensor, compile: bool = True) -> bool:
    """TIES (magnitude sparsifier, sign consensus, no rescale; a consensus method without a
    sparsifier declares no density: all kept) into `out`, fused; False where nothing is merged
    (the reference handles a group of the base alone). `x.rescale` is not read."""
    assert x.base is not None
    flat_base = x.base.reshape(-1).float()
    n = flat_base.numel()
    ds = [s.reshape(-1).float() - flat_base for s in x.sources]
    if not ds:
        return False
    vs, cuts, keep_all = [], [], []
    for d, p in zip(ds, x.params):
        ranks = selection.magnitude_ranks(p.get("density", 1.0), n)

        def cut(k: int, d: torch.Tensor = d) -> selection.Cut:
            return selection.exact_cut(d.abs(), k)

        keep = ranks.cuts(cut)[0] if ranks else None
        keep_all.append(keep is None)
        vs.append(0.0 if keep is None else keep.v)
        cuts.append(n if keep is None else keep.index)
    dev = flat_base.device
    fn = combine_compiled if compile else combine
    merged = fn(
        flat_base,
        ds,
        torch.tensor(vs, dtype=F32, device=dev),
        torch.tensor(cuts, dtype=torch.int64, device=dev),
        torch.tensor([p["weight"] for p in x.params], dtype=F32, device=dev),
        torch.tensor(x.group["lambda"], dtype=F32, device=dev),
        tuple(keep_all),
        x.normalize,
    )
    if not bool(torch.isfinite(merged).all()):
        raise NonFinite
    out.view(-1).copy_(merged)
    return True
