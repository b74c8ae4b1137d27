"""The README's main job."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

console = Console()


def run_demo(out: Path) -> None:
    """Interim demo: a TIES merge of three generated checkpoints, loaded back and run."""
    import torch
    from transformers import AutoModelForCausalLM

    from merge.engine import merge_to_dir
    from merge.recipe import Recipe
    from merge.synthetic import make_family

    paths = make_family(out / "models", experts=2, num_hidden_layers=4)
    recipe = Recipe.parse({
        "dtype": "float32",
        "models": {a: {"path": str(p)} for a, p in paths.items()},
        "parameter_space": {"method": "ties", "base": "base", "groups": [
            {"layers": [0, 2], "params": {"expert1": {"weight": 0.7, "density": 0.5},
                                          "expert2": {"weight": 0.3, "density": 0.5}}},
            {"layers": [2, 4], "params": {"expert1": {"weight": 0.3, "density": 0.8},
                                          "expert2": {"weight": 0.7, "density": 0.8}}},
        ]},
    })  # fmt: skip
    recipe.save(out / "recipe.yaml")
    merged = merge_to_dir(recipe, out / "merged", force=True)
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokens = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8, do_sample=False)
    console.print(f"merged model at {merged}; greedy continuation: {tokens[0].tolist()}")
