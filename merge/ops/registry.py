"""Merge methods that declare themselves, and the registry that holds them.

The recipe's checks, the search's genes and the mergekit export read the declarations, so a new
method is one `register(Method(...))` (docs/ARCHITECTURE.md, "The recipe").
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from evomerge.merge.errors import EvomergeError
from evomerge.merge.lazy import lazy
from evomerge.merge.ops.inputs import TensorInputs
from evomerge.merge.ops.rescale import Rescale

if TYPE_CHECKING:
    import torch

    from evomerge.merge import parallel
    from evomerge.merge.ops import fused, kernels, methods, sparsify
    from evomerge.merge.ops.masks import Generator
    from evomerge.merge.parallel import Workers
else:
    # the declarations (the recipe schema, `evomerge status` and `report`) need no torch: the
    # tensor modules are imported where a merge first runs (merge.lazy)
    torch = lazy("torch")
    fused, kernels = lazy("evomerge.merge.ops.fused"), lazy("evomerge.merge.ops.kernels")
    methods, parallel = lazy("evomerge.merge.ops.methods"), lazy("evomerge.merge.parallel")
    sparsify = lazy("evomerge.merge.ops.sparsify")


@dataclass(frozen=True)
class Param:
    """A parameter a method reads, per merged model or per layer group."""

    name: str
    default: float
    low: float = -math.inf  # valid range; `open_low` / `open_high` exclude the end itself
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    search: tuple[float, float, float] | None = None  # default gene range: (low, high, init)
    searched_by_default: bool = True  # a gene unless the search config says otherwise
    doc: str = ""

    def problem(self, value: float) -> str | None:
        """Why `value` is not a valid value of this parameter, or None."""
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return f"must be a finite number, got {value!r}"
        below = value <= self.low if self.open_low else value < self.low
        above = value >= self.high if self.open_high else value > self.high
        if below or above:
            return f"must be in {self.interval()}, got {value}"
        return None

    def interval(self) -> str:
        return f"{'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"


MergeFn = Callable[[TensorInputs], "torch.Tensor"]
# Writes the merge into `out` (the tensor's shape, any float dtype, contiguous): on a CPU the
# same bits as `merge(...).to(out.dtype)`, raising kernels.NonFinite where the result is not
# finite. Returns False for inputs it does not take (the reference `merge` then runs).
MergeIntoFn = Callable[[TensorInputs, "torch.Tensor", "Workers"], bool]


@dataclass(frozen=True)
class Method:
    name: str
    paper: str
    merge: MergeFn
    model_params: tuple[Param, ...] = ()
    group_params: tuple[Param, ...] = ()
    needs_base: bool = False  # the base is an input of its own, never one of the merged models
    min_models: int = 1  # merged models per group (besides a needed base)
    max_models: int | None = None
    random: bool = False  # needs a seeded generator (masks); results reproducible from the seed
    options: tuple[str, ...] = ()  # which of the recipe's `normalize` / `rescale` it reads
    default_normalize: bool = False
    default_rescale: Rescale = Rescale.none
    mergekit: bool = True  # mergekit has it under this name, with the same parameter names
    merge_into: MergeIntoFn | None = None  # optional: `merge` chunked, in place (merge.kernels)
    # every output entry reads only the same entry of the inputs (and, for a random method, that
    # entry's counter draw): off a CPU, `merge` then runs a chunk at a time (fused.chunked_into)
    elementwise: bool = False

    def param(self, name: str) -> Param:
        for p in (*self.model_params, *self.group_params):
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in (*self.group_params, *self.model_params)]

    def models_problem(self, n: int) -> str | None:
        """Why `n` merged models do not suit this method, or None."""
        lo, hi = self.min_models, self.max_models
        if lo <= n and (hi is None or n <= hi):
            return None
        count = f"exactly {lo}" if hi == lo else f"at least {lo}" if hi is None else f"{lo} to {hi}"
        besides = " besides the base" if self.needs_base else ""
        return f"{self.name} merges {count} model(s){besides}; the group has {n}"


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry; a name is registered once."""
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    names = [p.name for p in (*method.model_params, *method.group_params)]
    if len(set(names)) != len(names):
        raise ValueError(f"merge method {method.name!r} declares a parameter twice: {names}")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The method called `name`; an unknown name is answered with the closest known ones."""
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(name, list(METHODS), n=2)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise EvomergeError(f"unknown merge method {name!r}: {hint}known: {', '.join(METHODS)}")


def merge_tensor(method: Method, inputs: TensorInputs) -> torch.Tensor:
    """Merge one tensor in fp32: the reference computation."""
    if method.random and inputs.generator is None:
        raise ValueError(f"{method.name} is random and needs a seeded generator")
    return method.merge(inputs)


def merge_tensor_into(
    method: Method, inputs: TensorInputs, out: torch.Tensor, workers: Workers
) -> None:
    """Merge one tensor into `out`, cast to its dtype: the bits of `merge_tensor(...).to(out.dtype)`.

    Chunked over `workers` where the method has a `merge_into` that takes these inputs on this
    device; otherwise the reference, single-threaded (merge.parallel: reductions then do not
    depend on the thread count). Raises kernels.NonFinite on NaN or inf."""
    if method.random and inputs.generator is None:
        raise ValueError(f"{method.name} is random and needs a seeded generator")
    with parallel.single_thread():
        if (
            method.merge_into is not None
            and out.is_contiguous()
            and method.merge_into(inputs, out, workers)
        ):
            return
        if out.device.type != "cpu" and out.is_contiguous() and chunkable(method, inputs):
            fused.chunked_into(method.merge, inputs, out)
            return
        merged = method.merge(inputs)
        if not bool(torch.isfinite(merged).all()):
            raise kernels.NonFinite
        out.copy_(merged.reshape(out.shape))


def chunkable(method: Method, inputs: TensorInputs | None = None, masks: str = "counter") -> bool:
    """Whether `method` (with these inputs, or a recipe's `masks`) merges a chunk at a time off a
    CPU: elementwise, no L1 rescale (whole-tensor sums), and random draws that are per entry."""
    if not method.elementwise:
        return False
    if inputs is None:
        return not method.random or masks == "counter"
    if inputs.rescale is Rescale.l1:
        return False
    from evomerge.merge.ops.masks import CounterDraws  # the parameter `masks` hides the module

    return not method.random or isinstance(inputs.generator, CounterDraws)


# -- the parameters ---------------------------------------------------------------------------

WEIGHT = Param("weight", 1.0, search=(0.0, 1.5, 0.5), doc="the model's coefficient")
DENSITY = Param(
    "density", 1.0, 0.0, 1.0, open_low=True, search=(0.05, 1.0, 1.0), doc="fraction kept"
)
GAMMA = Param(
    "gamma", 0.01, 0.0, 1.0, open_high=True, search=(0.0, 0.2, 0.01), doc="outliers dropped"
)
EPSILON = Param(
    "epsilon", 0.15, 0.0, 1.0, open_high=True, search=(0.0, 0.2, 0.1), doc="DELLA's spread"
)
LAMBDA = Param(
    "lambda", 1.0, search=(0.0, 2.0, 1.0), searched_by_default=False, doc="task-vector scale"
)
T = Param("t", 0.5, 0.0, 1.0, search=(0.0, 1.0, 0.5), doc="0: the base, 1: the other model")


# -- the task-vector family -------------------------------------------------------------------


@dataclass(frozen=True)
class Sparsifier:
    """Thins one task vector: the first primitive of the task-vector family."""

    params: tuple[Param, ...]
    thin: Callable[[torch.Tensor, dict[str, float], Rescale, Generator | None], torch.Tensor]
    random: bool = False
    kernel: str | None = None  # its name in merge.kernels' chunked path, if it has one


def _magnitude(d: torch.Tensor, p: dict, rescale: Rescale, g: Generator | None):
    return sparsify.magnitude(d, p["density"], rescale)


def _outliers(d: torch.Tensor, p: dict, rescale: Rescale, g: Generator | None):
    return sparsify.magnitude_outliers(d, p["density"], p["gamma"], rescale)


def _random(d: torch.Tensor, p: dict, rescale: Rescale, g: Generator | None):
    assert g is not None  # merge_tensor gives every random method its seeded generator
    return sparsify.random(d, p["density"], g, rescale)


def _della(d: torch.Tensor, p: dict, rescale: Rescale, g: Generator | None):
    assert g is not None
    return sparsify.della_magprune(d, p["density"], p["epsilon"], g, rescale)


MAGNITUDE = Sparsifier((DENSITY,), _magnitude, kernel="magnitude")  # TIES
OUTLIERS = Sparsifier((DENSITY, GAMMA), _outliers, kernel="outliers")  # breadcrumbs
RANDOM = Sparsifier((DENSITY,), _random, random=True, kernel="random")  # DARE
DELLA = Sparsifier((DENSITY, EPSILON), _della, random=True)


def task_vector_method(
    name: str,
    paper: str,
    sparsifier: Sparsifier | None = None,
    consensus: bool = False,
    default_normalize: bool = False,
    default_rescale: Rescale = Rescale.none,
) -> Method:
    """base + lambda * mix(weight_i * thin(x_i - base)), with optional TIES sign consensus."""

    def merge(x: TensorInputs) -> torch.Tensor:
        assert x.base is not None
        base = x.base.float()
        deltas = [s.float() - base for s in x.sources]
        if not deltas:
            return base
        if sparsifier is not None:
            deltas = [
                sparsifier.thin(d, p, x.rescale, x.generator) for d, p in zip(deltas, x.params)
            ]
        weights = [p["weight"] for p in x.params]
        return methods.combine_deltas(
            base, deltas, weights, consensus, x.normalize, x.group["lambda"]
        )

    def merge_into(x: TensorInputs, out: torch.Tensor, workers: Workers) -> bool:
        assert x.base is not None
        if sparsifier is not None and (sparsifier.kernel is None or x.rescale is Rescale.l1):
            return False
        devices = {t.device.type for t in [out, x.base, *x.sources]}
        if devices == {"cuda"}:  # TIES fused and compiled on a GPU; the rest: the reference
            fusable = consensus and x.rescale is Rescale.none and sparsifier in (None, MAGNITUDE)
            return fusable and fused.ties_into(x, out)
        if devices != {"cpu"}:
            return False
        kernels.task_vector_into(
            sparsifier.kernel if sparsifier else None, consensus, x, out, workers
        )
        return True

    return Method(
        name,
        paper,
        merge,
        model_params=(WEIGHT, *(sparsifier.params if sparsifier else ())),
        group_params=(LAMBDA,),
        needs_base=True,
        min_models=0,  # a group of the base alone keeps the base
        random=bool(sparsifier and sparsifier.random),
        elementwise=sparsifier in (None, RANDOM),  # magnitude cuts and DELLA's ranks are not
        options=("normalize", "rescale"),
        default_normalize=default_normalize,
        default_rescale=default_rescale,
        merge_into=merge_into,
    )


# -- the built-in methods ---------------------------------------------------------------------


def _linear(x: TensorInputs) -> torch.Tensor:
    return methods.linear(
        [s.float() for s in x.sources], [p["weight"] for p in x.params], x.normalize
    )


def _slerp(x: TensorInputs) -> torch.Tensor:
    assert x.base is not None
    return methods.slerp(x.base, x.sources[0], x.group["t"])


def _passthrough(x: TensorInputs) -> torch.Tensor:
    return x.sources[0].float()


def _cpu(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def _linear_into(x: TensorInputs, out: torch.Tensor, workers: Workers) -> bool:
    if not _cpu(out, *x.sources):
        return False
    kernels.linear_into(x, out, workers)
    return True


def _passthrough_into(x: TensorInputs, out: torch.Tensor, workers: Workers) -> bool:
    if not _cpu(out, x.sources[0]):
        return False
    kernels.copy_into(x, out, workers)
    return True


_DARE = "Yu et al. 2023, Language Models are Super Mario (arXiv:2311.03099)"
_CRUMBS = "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)"
_DELLA = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"
_INVERSE = Rescale.inverse_density

for _method in [
    Method(
        "linear",
        "Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
        _linear,
        model_params=(WEIGHT,),
        options=("normalize",),
        default_normalize=True,
        merge_into=_linear_into,
        elementwise=True,
    ),
    Method(
        "slerp",
        "Shoemake 1985, spherical linear interpolation",
        _slerp,
        group_params=(T,),
        needs_base=True,
        max_models=1,
    ),
    Method(
        "passthrough",
        "copies a single source unchanged",
        _passthrough,
        max_models=1,
        merge_into=_passthrough_into,
        elementwise=True,
    ),
    task_vector_method(
        "task_arithmetic",
        "Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
    ),
    task_vector_method(
        "ties",
        "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
        MAGNITUDE,
        consensus=True,
        default_normalize=True,
    ),
    task_vector_method("dare_ties", _DARE, RANDOM, consensus=True, default_rescale=_INVERSE),
    task_vector_method("dare_linear", _DARE, RANDOM, default_rescale=_INVERSE),
    task_vector_method("breadcrumbs", _CRUMBS, OUTLIERS),
    task_vector_method("breadcrumbs_ties", _CRUMBS, OUTLIERS, consensus=True),
    task_vector_method(
        "della", _DELLA, DELLA, consensus=True, default_normalize=True, default_rescale=_INVERSE
    ),
    task_vector_method("della_linear", _DELLA, DELLA, default_rescale=_INVERSE),
]:
    register(_method)


def values(declared: Sequence[Param], given: dict[str, float]) -> dict[str, float]:
    """Every declared parameter's value: the given one, else its default."""
    return {p.name: float(given.get(p.name, p.default)) for p in declared}
