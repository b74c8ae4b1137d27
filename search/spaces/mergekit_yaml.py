"""A parameter-space recipe as a mergekit configuration.

Each layer range becomes a slice; per-kind groups (attention / mlp / other) and the embed and
head groups become mergekit conditional parameters (`[{filter: ..., value: ...}, ...]`, first
substring match wins). Deterministic methods are reproduced exactly; for DARE and DELLA mergekit
draws its own masks (and rescales by the L1 ratio), so its merge matches in distribution only.
"""

from __future__ import annotations

from evomerge.merge.architecture import classify
from evomerge.merge.recipe import Group, Recipe

_KIND_FILTERS = {"attention": ("self_attn", "attention", "attn"), "mlp": ("mlp", "feed_forward")}


def to_mergekit(recipe: Recipe, tensor_names: list[str], num_layers: int) -> dict:
    ps = recipe.parameter_space
    if ps is None:
        raise ValueError("a recipe without a parameter_space stage has no mergekit form")
    method = ps.merge_method
    table = ps.layout(num_layers)
    path = {a: m.pinned(f"models.{a}") for a, m in recipe.models.items()}  # org/name@commit
    embed_names = sorted(
        {n.rsplit(".", 1)[0] for n in tensor_names if classify(n).group == "embed"}
    )
    head_names = sorted(
        {n.rsplit(".", 1)[0] for n in tensor_names if classify(n).group in ("head", "final_norm")}
    )
    kind_filter = {
        k: next((f for f in fs if any(f".{f}." in n for n in tensor_names)), fs[0])
        for k, fs in _KIND_FILTERS.items()
    }

    ranges = sorted({g.layers for g in ps.groups if isinstance(g.layers, tuple)})
    cuts = sorted({0, num_layers, *[r[0] for r in ranges], *[r[1] for r in ranges]})
    slices = []
    for i, (start, end) in enumerate(zip(cuts, cuts[1:], strict=False)):
        by_kind = {k: table[start, k] for k in ("attention", "mlp", "other")}
        extra: list[tuple[str, Group]] = []
        if i == 0 and ("embed", "other") in table:
            extra += [(n, table["embed", "other"]) for n in embed_names]
        if end == num_layers and ("head", "other") in table:
            extra += [(n, table["head", "other"]) for n in head_names]
        aliases = list(
            dict.fromkeys(a for g in [*by_kind.values(), *(g for _, g in extra)] for a in g.params)
        )
        sources = []
        for alias in [ps.base, *[a for a in aliases if a != ps.base]] if ps.base else aliases:
            src: dict = {"model": path[alias], "layer_range": [start, end]}
            params = {}
            for field in (p.name for p in method.model_params):
                cond = _conditions(ps, alias, field, by_kind, extra, kind_filter)
                if cond is not None:
                    params[field] = cond
            if params:
                src["parameters"] = params
            sources.append(src)
        slice_: dict = {"sources": sources}
        slice_params = {}
        for param in method.group_params:
            resolved = ps.defaults.get(param.name, param.default)
            cond = _group_conditions(
                lambda g, name=param.name: g.values.get(name), by_kind, extra, kind_filter, resolved
            )
            if cond is not None:
                slice_params[param.name] = cond
        if slice_params:
            slice_["parameters"] = slice_params
        slices.append(slice_)
    global_params: dict = {p.name: ps.defaults.get(p.name, p.default) for p in method.group_params}
    if "normalize" in method.options:
        global_params["normalize"] = ps.options_normalize
    if "rescale" in method.options and ps.options_rescale.value != "none":
        global_params["rescale"] = True
    config: dict = {
        "merge_method": ps.method,
        "slices": slices,
        "parameters": global_params,
        "dtype": "float32",  # mergekit computes in `dtype`; evomerge merges in fp32
        "out_dtype": recipe.dtype,
    }
    if ps.base:
        config["base_model"] = path[ps.base]
    return config


def _conditions(ps, alias, field, by_kind, extra, kind_filter):
    def value(g: Group):
        return ps.model_values(g, alias)[field] if alias in g.params else None

    if all(value(g) is None for g in [*by_kind.values(), *(g for _, g in extra)]):
        return None
    return _merge_conditions(
        value, by_kind, extra, kind_filter, missing=0.0 if field == "weight" else None
    )


def _group_conditions(get, by_kind, extra, kind_filter, missing):
    """A per-group parameter, where some group sets its own (others take `missing`)."""
    if all(get(g) is None for g in [*by_kind.values(), *(g for _, g in extra)]):
        return None
    return _merge_conditions(get, by_kind, extra, kind_filter, missing=missing)


def _merge_conditions(value, by_kind, extra, kind_filter, missing):
    conds = [
        {"filter": name, "value": v}
        for name, g in extra
        if (v := value(g) if value(g) is not None else missing) is not None
    ]
    for kind in ("attention", "mlp"):
        v = value(by_kind[kind])
        v = missing if v is None else v
        if v is not None and by_kind[kind] is not by_kind["other"]:
            conds.append({"filter": kind_filter[kind], "value": v})
    default = value(by_kind["other"])
    default = missing if default is None else default
    if default is not None:
        conds.append({"value": default})
    if len(conds) == 1 and "filter" not in conds[0]:
        return conds[0]["value"]
    return conds
