"""Session fixtures: tiny checkpoints built once, and an offline, home-free environment."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["TQDM_DISABLE"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from evomerge.merge.synthetic import make_family  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _private_caches(tmp_path_factory):
    """lm-eval / datasets caches go to a temporary directory, never the user's home."""
    cache = tmp_path_factory.mktemp("hf-cache")
    os.environ["HF_DATASETS_CACHE"] = str(cache / "datasets")
    os.environ["HF_HOME"] = str(cache / "home")
    yield


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """base + expert1 + expert2: tiny Llama checkpoints (hidden 32, 2 layers), fp32."""
    return make_family(tmp_path_factory.mktemp("llama"), "llama", experts=2)


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("gpt2"), "gpt2", experts=2, seed=3)


def recipe_dict(paths, method="ties", layers=2, **ps):
    """A recipe over a family with one group covering all layers."""
    from evomerge.merge.ops.registry import get_method

    experts = [a for a in paths if a != "base"]
    declared = {p.name for p in get_method(method).model_params}
    params = {
        a: {k: v for k, v in {"weight": 0.5 + 0.1 * i, "density": 0.6}.items() if k in declared}
        for i, a in enumerate(experts)
    }
    return {
        "dtype": "float32",
        "models": {a: {"path": str(p)} for a, p in paths.items()},
        "parameter_space": {
            "method": method,
            "base": "base",
            "seed": 7,
            "groups": [{"layers": [0, layers], "params": params}],
            **ps,
        },
    }


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The zoo at its tiny size (seconds): real files and tasks, skills not learned."""
    from evomerge.fitness.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny", size="tiny", log=lambda *_: None)


def search_config(zoo, **overrides):
    """A small serial TIES search over the tiny zoo, as a SearchConfig."""
    from evomerge.search.config import SearchConfig

    data = {
        "name": "t",
        "models": {a: {"path": str(zoo / "llama" / a)} for a in ("base", "add", "caps")},
        "base": "base",
        "space": {"method": "ties", "layers_per_group": 1},
        "fitness": {
            "tasks": [{"name": "zoo_add_gen_search"}, {"name": "zoo_caps_mc_search"}],
            "include": [str(zoo / "tasks")],
            "limit": 8,
            "batch_size": 16,
        },
        "cma": {"popsize": 4, "budget": 12, "seed": 3, "sigma0": 0.3},
        "workers": {"count": 0},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            data[section] = {**data.get(section, {}), field: value}
        else:
            data[section] = value
    return SearchConfig.parse(data)


class Stop(Exception):
    """Stands in for a kill at a chosen moment."""


def stopping_after(results: int | None):
    """A Progress that raises Stop once the search has finished `results` trials (None: never)."""
    from evomerge.search.loop.driver import Progress

    seen = [0]

    def on_result(done, record, best):
        seen[0] += 1
        if results is not None and seen[0] >= results:
            raise Stop

    return Progress(on_result=on_result)
