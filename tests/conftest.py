"""Session fixtures: tiny checkpoints built once, and an offline, home-free environment."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["RAY_AUTH_MODE"] = "disabled"

import pytest  # noqa: E402
import torch  # noqa: E402

from merge.synthetic import make_family  # noqa: E402

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
    experts = [a for a in paths if a != "base"]
    params = {a: {"weight": 0.5 + 0.1 * i, "density": 0.6} for i, a in enumerate(experts)}
    return {
        "dtype": "float32",
        "models": {a: {"path": str(p)} for a, p in paths.items()},
        "parameter_space": {"method": method, "base": "base", "seed": 7,
                            "groups": [{"layers": [0, layers], "params": params}], **ps},
    }  # fmt: skip
