"""The registry of merge methods: what each needs and how one tensor is merged with it."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from evomerge.merge import methods, sparsify
from evomerge.merge.errors import EvomergeError
from evomerge.merge.methods import ModelParams, TensorOptions
from evomerge.merge.sparsify import Rescale


class Sparsifier(str, Enum):
    none = "none"
    magnitude = "magnitude"  # TIES
    random = "random"  # DARE
    outliers = "outliers"  # breadcrumbs
    della = "della"  # DELLA


@dataclass(frozen=True)
class Method:
    name: str
    paper: str
    family: str  # "linear" | "slerp" | "task_arithmetic" | "passthrough"
    sparsifier: Sparsifier = Sparsifier.none
    consensus: bool = False
    default_normalize: bool = False
    default_rescale: Rescale = Rescale.none
    per_model: tuple[str, ...] = ("weight",)  # parameters read per source model

    @property
    def needs_base(self) -> bool:
        return self.family in ("slerp", "task_arithmetic")

    @property
    def is_random(self) -> bool:
        return self.sparsifier in (Sparsifier.random, Sparsifier.della)


def _ta(name: str, paper: str, sparsifier: Sparsifier, consensus: bool, **kw) -> Method:
    extra = {
        Sparsifier.none: (),
        Sparsifier.magnitude: ("density",),
        Sparsifier.random: ("density",),
        Sparsifier.outliers: ("density", "gamma"),
        Sparsifier.della: ("density", "epsilon"),
    }[sparsifier]
    return Method(
        name, paper, "task_arithmetic", sparsifier, consensus, per_model=("weight", *extra), **kw
    )


_DARE = "Yu et al. 2023, Language Models are Super Mario (arXiv:2311.03099)"
_CRUMBS = "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)"
_DELLA = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"
METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "linear",
            "Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
            "linear",
            default_normalize=True,
        ),
        Method("slerp", "Shoemake 1985, spherical linear interpolation", "slerp", per_model=()),
        Method("passthrough", "copies a single source unchanged", "passthrough", per_model=()),
        _ta(
            "task_arithmetic",
            "Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
            Sparsifier.none,
            False,
        ),
        _ta(
            "ties",
            "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
            Sparsifier.magnitude,
            True,
            default_normalize=True,
        ),
        _ta("dare_ties", _DARE, Sparsifier.random, True, default_rescale=Rescale.inverse_density),
        _ta(
            "dare_linear", _DARE, Sparsifier.random, False, default_rescale=Rescale.inverse_density
        ),
        _ta("breadcrumbs", _CRUMBS, Sparsifier.outliers, False),
        _ta("breadcrumbs_ties", _CRUMBS, Sparsifier.outliers, True),
        _ta(
            "della",
            _DELLA,
            Sparsifier.della,
            True,
            default_normalize=True,
            default_rescale=Rescale.inverse_density,
        ),
        _ta(
            "della_linear", _DELLA, Sparsifier.della, False, default_rescale=Rescale.inverse_density
        ),
    ]
}


def get_method(name: str) -> Method:
    """The method called `name`; an unknown name is answered with the closest known ones."""
    if name in METHODS:
        return METHODS[name]
    close = difflib.get_close_matches(name, list(METHODS), n=2)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise EvomergeError(f"unknown merge method {name!r}: {hint}known: {', '.join(METHODS)}")


def sparsify_delta(
    method: Method,
    delta: torch.Tensor,
    params: ModelParams,
    rescale: Rescale,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Thin one task vector the way `method` does."""
    s = method.sparsifier
    if s is Sparsifier.magnitude:
        return sparsify.magnitude(delta, params.density, rescale)
    if s is Sparsifier.outliers:
        return sparsify.magnitude_outliers(delta, params.density, params.gamma, rescale)
    if s in (Sparsifier.random, Sparsifier.della):
        if generator is None:
            raise ValueError(f"{method.name} is random and needs a seeded generator")
        if s is Sparsifier.random:
            return sparsify.random(delta, params.density, generator, rescale)
        return sparsify.della_magprune(delta, params.density, params.epsilon, generator, rescale)
    return delta


def merge_tensor(
    method: Method,
    base: torch.Tensor | None,
    sources: Sequence[torch.Tensor],
    params: Sequence[ModelParams],
    options: TensorOptions,
    generator: torch.Generator | None = None,
    deltas: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merge one tensor in fp32. `sources` exclude the base; `params` go with `sources`.

    `deltas` (sources - base, fp32), when a caller keeps them resident, spare the subtraction.
    """
    if method.family == "passthrough":
        return (sources[0] if sources else base).float()  # type: ignore[union-attr]
    if method.family == "linear":
        return methods.linear(
            [x.float() for x in sources], [p.weight for p in params], options.normalize
        )
    assert base is not None, f"{method.name} needs a base model"
    if method.family == "slerp":
        return methods.slerp(base, sources[0], options.t)
    base32 = base.float()
    if deltas is None:
        deltas = [x.float() - base32 for x in sources]
    if not deltas:
        return base32
    thinned = [
        sparsify_delta(method, d, p, options.rescale, generator)
        for d, p in zip(deltas, params, strict=True)
    ]
    return methods.combine_deltas(
        base32,
        thinned,
        [p.weight for p in params],
        method.consensus,
        options.normalize,
        options.lambda_,
    )
