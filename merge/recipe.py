"""The recipe: the product's contract between search and merge (format in DESIGN.md).

A recipe knows nothing of the search. It names source models by alias, and says per layer group
(and optionally per kind of tensor: attention / mlp / other) how each model contributes.
Layer ranges are half-open, `[start, end)`, as mergekit's `layer_range`. Tensors outside the
decoder layers use the group named `embed` (embeddings) or `head` (head and final norm) when
the recipe has one, and otherwise the group of the first or the last layer.
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
    model_serializer,
    model_validator,
)

from evomerge.merge.architecture import KINDS, Slot
from evomerge.merge.errors import EvomergeError
from evomerge.merge.methods import ModelParams, TensorOptions
from evomerge.merge.registry import get_method
from evomerge.merge.sparsify import Rescale

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
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelRef(_Strict):
    path: str


class Params(_Strict):
    """One model's parameters in one group."""

    weight: float = 1.0
    density: float = 1.0
    gamma: float = 0.01
    epsilon: float = 0.15

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("density")
    @classmethod
    def _density(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @field_validator("gamma")
    @classmethod
    def _gamma(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v

    @model_serializer(mode="wrap")
    def _compact(self, handler):
        """Omit density / gamma / epsilon at their defaults: a TIES recipe shows no gamma."""
        data = handler(self)
        for name in ("density", "gamma", "epsilon"):
            if data.get(name) == type(self).model_fields[name].default:
                data.pop(name)
        return data

    def to_model_params(self) -> ModelParams:
        return ModelParams(self.weight, self.density, self.gamma, self.epsilon)


class Group(_Strict):
    """Parameters for a range of layers (or the embed / head group) and a kind of tensor."""

    layers: tuple[int, int] | Literal["embed", "head"]
    tensors: Literal["all", "attention", "mlp", "other"] = "all"
    params: dict[str, Params] = Field(default_factory=dict)
    t: float | None = None  # slerp
    lambda_: float | None = Field(default=None, alias="lambda")

    @field_validator("layers")
    @classmethod
    def _range(cls, v):
        if isinstance(v, tuple) and not 0 <= v[0] < v[1]:
            raise ValueError(f"need 0 <= start < end (half-open range), got {list(v)}")
        return v

    def label(self) -> str:
        where = self.layers if isinstance(self.layers, str) else f"layers {list(self.layers)}"
        return where if self.tensors == "all" else f"{where} ({self.tensors})"


class ParameterSpace(_Strict):
    method: MethodName
    base: str | None = None
    normalize: bool | None = None  # None: the method's default
    lambda_: float = Field(default=1.0, alias="lambda")
    rescale: Rescale | None = None  # None: the method's default
    seed: int = 0
    groups: list[Group]

    @model_validator(mode="after")
    def _per_group(self) -> ParameterSpace:
        method = get_method(self.method)
        if method.needs_base and self.base is None:
            raise ValueError(f"method {self.method} needs a base model: set parameter_space.base")
        normalize = self.normalize if self.normalize is not None else method.default_normalize
        for i, g in enumerate(self.groups):
            sources = [a for a in g.params if a != self.base]
            if method.family == "slerp" and len(sources) != 1:
                raise ValueError(f"groups.{i}: slerp needs exactly one model besides the base")
            if method.family == "passthrough" and len(g.params) != 1:
                raise ValueError(f"groups.{i}: passthrough takes exactly one model")
            weights = [g.params[a].weight for a in sources]
            if method.family == "linear":
                weights = [p.weight for p in g.params.values()]
            if normalize and weights and abs(sum(weights)) < 1e-8:
                raise ValueError(
                    f"groups.{i}: weights sum to zero under normalize; "
                    "change a weight or set normalize: false"
                )
        return self

    def options(self, group: Group) -> TensorOptions:
        method = get_method(self.method)
        return TensorOptions(
            normalize=self.normalize if self.normalize is not None else method.default_normalize,
            rescale=self.rescale if self.rescale is not None else method.default_rescale,
            lambda_=group.lambda_ if group.lambda_ is not None else self.lambda_,
            t=group.t if group.t is not None else 0.5,
        )

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
            raise EvomergeError(one_line(e, source)) from None

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: Path | str) -> None:
        write_atomic(Path(path), self.to_yaml())


def read_yaml(path: Path, what: str) -> object:
    if not path.is_file():
        raise EvomergeError(f"{path}: {what} file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EvomergeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def one_line(err: ValidationError, source: str) -> str:
    """A pydantic error as one line: the file, the field path and what is wrong."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field; remove it or check its spelling"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {where}: {msg}{more}"


def write_atomic(path: Path, text: str) -> None:
    """Write a text file so that readers see the old or the new content, never a mix."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
