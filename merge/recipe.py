"""The recipe schema: the contract between search and merge (docs/ARCHITECTURE.md).

Layer ranges are half-open, `[start, end)`, as mergekit's `layer_range`. Tensors outside the
decoder layers use the group `embed` (embeddings) or `head` (head and final norm) when the
recipe has one, else the first or the last layer's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.merge.architecture import KINDS, Slot
from evomerge.merge.errors import EvomergeError, schema_problems
from evomerge.merge.io import hub
from evomerge.merge.io.files import read_yaml, write_atomic
from evomerge.merge.ops.registry import Method, get_method, values
from evomerge.merge.ops.rescale import Rescale

FORMAT: Literal["evomerge-recipe/1"] = "evomerge-recipe/1"
DType = Literal["float32", "bfloat16", "float16"]


def known_method(name: str) -> str:
    """A pydantic validator's view of `get_method`: the did-you-mean error as a ValueError."""
    try:
        get_method(name)
    except EvomergeError as e:
        raise ValueError(str(e)) from None
    return name


# a merge method's name, checked against the registry (with its did-you-mean error)
MethodName = Annotated[str, AfterValidator(known_method)]


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )


class ModelRef(_Strict):
    path: str  # a local directory, or a hub ID `org/name[@revision]` (merge.hub)

    def local(self, label: str = "model") -> Path:
        """The directory to read (a hub reference resolved through the cache)."""
        return hub.resolve(self.path, label).local

    def pinned(self, label: str = "model") -> str:
        """The reference to record: a hub ID at its commit, or the absolute local path."""
        return hub.resolve(self.path, label).pinned


Values = dict[str, float]  # parameter name -> value


class Group(BaseModel):
    """Parameters for a range of layers (or the embed / head group) and a kind of tensor.

    `params` holds each model's parameters; the method's per-group parameters (slerp's `t`,
    the task-vector family's `lambda`) sit on the group itself, as in mergekit's slices. Which
    names are allowed is the method's declaration (checked by ParameterSpace)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    layers: tuple[int, int] | Literal["embed", "head"]
    tensors: Literal["all", "attention", "mlp", "other"] = "all"
    params: dict[str, Values] = Field(default_factory=dict)

    @field_validator("layers")
    @classmethod
    def _range(cls, v):
        if isinstance(v, tuple) and not 0 <= v[0] < v[1]:
            raise ValueError(f"need 0 <= start < end (half-open range), got {list(v)}")
        return v

    @property
    def values(self) -> Values:
        """The per-group parameters set on this group."""
        return dict(self.model_extra or {})

    def label(self) -> str:
        where = self.layers if isinstance(self.layers, str) else f"layers {list(self.layers)}"
        return where if self.tensors == "all" else f"{where} ({self.tensors})"


class ParameterSpace(BaseModel):
    """The parameter-space stage. Per-group parameters given here (e.g. `lambda: 0.5`) are the
    default of every group that does not set its own."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)

    method: MethodName
    base: str | None = None
    normalize: bool | None = None  # None: the method's default
    rescale: Rescale | None = None  # None: the method's default
    seed: int = 0
    # random masks' generator (ops.masks): counter, what searches write; torch, that of
    # recipes written before, which they rebuild
    masks: Literal["torch", "counter"] = "torch"
    groups: list[Group] = Field(min_length=1)

    @property
    def merge_method(self) -> Method:
        return get_method(self.method)

    @property
    def defaults(self) -> Values:
        """Per-group parameters set for every group."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _declared(self) -> ParameterSpace:
        """Every parameter is one the method declares, with a valid value; group sizes fit."""
        method = self.merge_method
        if method.needs_base and self.base is None:
            raise ValueError(f"method {self.method} needs a base model: set parameter_space.base")
        for option in ("normalize", "rescale"):
            if getattr(self, option) is not None and option not in method.options:
                raise ValueError(f"{option}: {self.method} does not read it; remove it")
        group_params = {p.name: p for p in method.group_params}
        model_params = {p.name: p for p in method.model_params}
        _check_values("", self.defaults, group_params, self.method, "group")
        for i, g in enumerate(self.groups):
            where = f"groups.{i}"
            _check_values(where, g.values, group_params, self.method, "group")
            for alias, given in g.params.items():
                _check_values(f"{where}.params.{alias}", given, model_params, self.method, "model")
            merged = self.merged_models(g)
            if (problem := method.models_problem(len(merged))) is not None:
                raise ValueError(f"{where}: {problem}")
            if self.options_normalize and "weight" in model_params and merged:
                total = sum(g.params[a].get("weight", 1.0) for a in merged)
                if abs(total) < 1e-8:
                    raise ValueError(
                        f"{where}: weights sum to zero under normalize; "
                        "change a weight or set normalize: false"
                    )
        return self

    @property
    def options_normalize(self) -> bool:
        return self.normalize if self.normalize is not None else self.merge_method.default_normalize

    @property
    def options_rescale(self) -> Rescale:
        return self.rescale if self.rescale is not None else self.merge_method.default_rescale

    def merged_models(self, group: Group) -> list[str]:
        """The models a group merges: its listed models, less the base when the method takes the
        base as an input of its own."""
        method = self.merge_method
        return [a for a in group.params if not (method.needs_base and a == self.base)]

    def model_values(self, group: Group, alias: str) -> Values:
        return values(self.merge_method.model_params, group.params.get(alias, {}))

    def group_values(self, group: Group) -> Values:
        return values(self.merge_method.group_params, {**self.defaults, **group.values})

    def layout(self, num_layers: int) -> dict[tuple[int | str, str], Group]:
        """(layer index or "embed"/"head", tensor kind) -> its group; every layer covered once."""
        table: dict[tuple[int | str, str], Group] = {}
        for g in self.groups:
            where: list[int | str] = (
                [g.layers] if isinstance(g.layers, str) else list(range(*g.layers))
            )
            for w in where:
                if isinstance(w, int) and w >= num_layers:
                    raise EvomergeError(
                        f"recipe group {g.label()}: layer {w} does not exist "
                        f"(the models have {num_layers} layers)"
                    )
                for kind in KINDS if g.tensors == "all" else (g.tensors,):
                    if (w, kind) in table:
                        raise EvomergeError(
                            f"recipe groups {table[w, kind].label()} and {g.label()} overlap at "
                            f"{w if isinstance(w, str) else f'layer {w}'} ({kind}); "
                            "make the layer ranges disjoint"
                        )
                    table[w, kind] = g
        for layer in range(num_layers):
            for kind in KINDS:
                if (layer, kind) not in table:
                    raise EvomergeError(
                        f"recipe: layer {layer} ({kind} tensors) is in no group; "
                        f"the groups must cover layers 0..{num_layers - 1}"
                    )
        return table

    @staticmethod
    def group_for(table: dict[tuple[int | str, str], Group], slot: Slot, num_layers: int) -> Group:
        if slot.group == "layer":
            return table[slot.layer, slot.kind]  # type: ignore[index]
        if slot.group == "embed":
            return table.get(("embed", "other")) or table[0, "other"]
        return table.get(("head", "other")) or table[num_layers - 1, "other"]


def _check_values(where: str, given: dict, declared: dict, method: str, scope: str) -> None:
    """Each given parameter is declared by the method (at this scope) with a valid value."""
    for name, value in given.items():
        field = f"{where}.{name}" if where else name
        if name not in declared:
            known = ", ".join(declared) or "none"
            raise ValueError(
                f"{field}: unknown field; remove it or check its spelling ({method}'s per-{scope} "
                f"parameters: {known})"
            )
        if (problem := declared[name].problem(value)) is not None:
            raise ValueError(f"{field}: {problem}")


class PathHop(_Strict):
    """One hop of a data-flow path: a layer of a model (or of the stage-1 result, "ps")."""

    model: str
    layer: int = Field(ge=0)
    scale: float = 1.0  # multiplies the hidden state on its way into this layer

    @field_validator("scale")
    @classmethod
    def _positive(cls, v: float) -> float:
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(
                f"must be positive (norms are invariant to positive scales only), got {v}"
            )
        return v


class DataFlow(_Strict):
    embed_from: str  # the model giving embeddings, final norm and head: an alias or "ps"
    path: list[PathHop] = Field(min_length=1)


PS = "ps"  # the alias of the parameter-space stage's result in a data-flow path


class Recipe(_Strict):
    format: Literal["evomerge-recipe/1"] = FORMAT
    dtype: DType = "bfloat16"
    allow_pickle: bool = False
    files_from: str | None = None  # alias whose config and tokenizer are copied (default: base)
    models: dict[str, ModelRef]
    parameter_space: ParameterSpace | None = None
    data_flow: DataFlow | None = None

    @model_validator(mode="after")
    def _aliases(self) -> Recipe:
        if self.parameter_space is None and self.data_flow is None:
            raise ValueError("a recipe needs a parameter_space stage, a data_flow stage, or both")
        if self.data_flow is not None:
            flow_known = set(self.models) | ({PS} if self.parameter_space else set())
            for i, alias in enumerate(
                [self.data_flow.embed_from, *(h.model for h in self.data_flow.path)]
            ):
                if alias not in flow_known:
                    where = "data_flow.embed_from" if i == 0 else f"data_flow.path.{i - 1}.model"
                    raise ValueError(
                        f"{where}: {alias!r} is not in models"
                        f"{' (or ps, with a parameter_space stage)' if not self.parameter_space else ' or ps'}"
                    )
        if self.parameter_space is None:
            return self
        ps = self.parameter_space
        known = set(self.models)
        for named in [ps.base, self.files_from]:
            if named is not None and named not in known:
                raise ValueError(f"model alias {named!r} is not in models ({', '.join(known)})")
        for i, g in enumerate(ps.groups):
            for alias in g.params:
                if alias not in known:
                    raise ValueError(
                        f"parameter_space.groups.{i}.params: {alias!r} is not in models "
                        f"({', '.join(sorted(known))})"
                    )
        return self

    @property
    def main_alias(self) -> str:
        """The model whose config and tokenizer the output takes."""
        ps = self.parameter_space
        if self.files_from:
            return self.files_from
        if ps is None:
            assert self.data_flow is not None
            return self.data_flow.embed_from
        return ps.base or next(iter(ps.groups[0].params))

    def pinned(self) -> Recipe:
        """This recipe with every hub reference pinned to its commit (resolving it)."""
        models = {a: {"path": m.pinned(f"models.{a}")} for a, m in self.models.items()}
        return self.model_copy(update={"models": {a: ModelRef(**m) for a, m in models.items()}})

    def ps_only(self) -> Recipe:
        """The parameter-space stage alone (the `ps` model of a data-flow path)."""
        return self.model_copy(update={"data_flow": None})

    @classmethod
    def single_group(
        cls,
        models: dict[str, str],
        base: str,
        method: str,
        num_layers: int,
        params: dict[str, dict],
        dtype: str = "float32",
        **ps,
    ) -> Recipe:
        """One group over all layers: the merges a user tries by hand."""
        return cls.parse(
            {
                "dtype": dtype,
                "models": {a: {"path": str(p)} for a, p in models.items()},
                "parameter_space": {
                    "method": method,
                    "base": base,
                    **ps,
                    "groups": [{"layers": [0, num_layers], "params": params}],
                },
            }
        )

    # -- files --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path | str) -> Recipe:
        return cls.parse(read_yaml(Path(path), "recipe"), source=str(path))

    @classmethod
    def parse(cls, data: object, source: str = "recipe") -> Recipe:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise EvomergeError(schema_problems(e, source)) from None

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: Path | str) -> None:
        write_atomic(Path(path), self.to_yaml())
