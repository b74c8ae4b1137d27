"""The `evomerge` command line. Heavy imports happen inside commands so `--help` stays fast."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from merge.errors import EvomergeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Evolutionary merge search for language models that share a base.",
)
console = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


def user_errors(fn):
    """Turn an EvomergeError into one red line on stderr and exit code 2 (traceback: --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EvomergeError as e:
            if _state["debug"]:
                raise
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def progress_bar(description: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[item]}"), console=console, transient=False,
    )  # fmt: skip


@app.command()
@user_errors
def merge(
    recipe: Path = typer.Argument(..., help="Recipe YAML (evomerge-recipe/1)."),
    out: Path = typer.Argument(..., help="Output model directory."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]: where tensors are merged."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 2GB."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
):
    """Rebuild a recipe's merged model as a safetensors checkpoint."""
    from merge.engine import merge_to_dir
    from merge.recipe import Recipe

    r = Recipe.load(recipe)
    bar = progress_bar("merging")
    task = bar.add_task("merge", total=None, item="")

    def tick(done: int, total: int, name: str) -> None:
        bar.start()  # only once the inputs have been checked: errors print on a clean line
        bar.update(task, completed=done, total=total, item=name)

    try:
        merge_to_dir(r, out, device=device, max_shard_size=max_shard_size, force=force,
                     progress=tick)  # fmt: skip
    finally:
        bar.stop()
    console.print(f"wrote {out}")


@app.command()
@user_errors
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo writes its outputs."),
):
    """The main job on the embedded default: a search over the tiny zoo, on this machine."""
    from search.demo import run_demo

    run_demo(out)


def main() -> None:  # pragma: no cover - console entry for `python -m search.cli`
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
