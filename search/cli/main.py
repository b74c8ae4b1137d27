"""The `evomerge` command line. Heavy imports happen inside commands so `--help` stays fast."""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import os
import signal
import sys
from pathlib import Path

import typer

from evomerge.merge.errors import EvomergeError
from evomerge.search.cli.console import console, ensure_zoo, refuse, run_and_report, warn

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Evolutionary merge search for language models that share a base.",
)
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


# What the environment refuses (a full disk, a read-only folder, a path under a regular file),
# said once and plainly: every write is atomic, so nothing half-written was left behind.
_OS_FIXES = {
    errno.ENOSPC: "free some space, then run the command again (a search: evomerge resume)",
    errno.EDQUOT: "free some space, then run the command again (a search: evomerge resume)",
    errno.EROFS: "choose a writable location",
    errno.EACCES: "check the permissions or choose another location",
    errno.EPERM: "check the permissions or choose another location",
    errno.ENOTDIR: "a part of the path is a file, not a directory; fix the path",
    errno.EISDIR: "the path is a directory; give a file",
    errno.ENAMETOOLONG: "shorten the path",
}


def user_errors(fn):
    """Turn an EvomergeError (or an OSError the environment raised) into one red line per
    problem on stderr and exit code 2 (traceback: --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (EvomergeError, OSError) as e:
            if _state["debug"] or (isinstance(e, OSError) and _OS_FIXES.get(e.errno or 0) is None):
                raise
            for line in str(e).splitlines() if isinstance(e, EvomergeError) else [_os_line(e)]:
                console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _os_line(e: OSError) -> str:
    where = e.filename if e.filename is not None else "output"
    return f"{where}: {e.strerror}; {_OS_FIXES[e.errno or 0]}"


def set_env(offline: bool) -> None:
    """Quiet libraries; no hub access when asked (--offline) or by construction (zoo, demo)."""
    from evomerge.search import env

    env.offline() if offline else env.quiet()


OFFLINE = typer.Option(
    False, "--offline", help="Never reach the hub: models and datasets from the cache only."
)


@contextlib.contextmanager
def heavy_imports():
    """Import torch and friends (or read a run's journal) with the cyclic GC off, then freeze
    what they made: the GC otherwise rescans their ~180k objects again and again (~0.25 s of a
    2.5 s start-up, measured). Imports make no garbage cycles worth collecting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def progress_bar(description: str):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[item]}"),
        console=console,
        transient=True,  # an error ends on its own line, not after a stale bar
    )


@app.command()
@user_errors
def merge(
    recipe: Path = typer.Argument(..., help="Recipe YAML (evomerge-recipe/1)."),
    out: Path = typer.Argument(..., help="Output model directory."),
    device: str = typer.Option("cpu", help="cpu or cuda[:N]: where tensors are merged."),
    max_shard_size: str = typer.Option("5GB", help="Largest safetensors shard, e.g. 2GB."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    offline: bool = OFFLINE,
):
    """Rebuild a recipe's merged model as a safetensors checkpoint."""
    set_env(offline)
    with heavy_imports():
        from evomerge.merge.engine import merge_to_dir
        from evomerge.merge.recipe import Recipe

    r = Recipe.load(recipe)
    bar = progress_bar("merging")
    task = bar.add_task("merge", total=None, item="")

    def tick(done: int, total: int, name: str) -> None:
        bar.start()  # only once the inputs have been checked: errors print on a clean line
        bar.update(task, completed=done, total=total, item=name)

    try:
        merge_to_dir(
            r,
            out,
            device=device,
            max_shard_size=max_shard_size,
            force=force,
            progress=tick,
            inputs=[recipe],
        )
    finally:
        bar.stop()
    console.print(f"wrote {out}")


zoo_app = typer.Typer(no_args_is_help=True, help="The offline tiny model zoo.")
app.add_typer(zoo_app, name="zoo")


@zoo_app.command("build")
@user_errors
def zoo_build(
    out: Path = typer.Option(
        None, help="Zoo directory (default: a cache dir named by its parameters)."
    ),
    size: str = typer.Option("demo", help="tiny (tests, seconds) or demo (real skills, minutes)."),
    seed: int = typer.Option(0, help="Everything in the zoo derives from this seed."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when a matching zoo exists."),
    table: bool = typer.Option(True, help="Score the specialisation table on the held-out split."),
):
    """Build the zoo (base, experts, distractor, joint reference, a second family, tasks)."""
    set_env(True)
    from evomerge.fitness.zoo.build import build_zoo

    zoo = build_zoo(out, size=size, seed=seed, log=console.print, force=force)
    os.environ.setdefault("HF_DATASETS_CACHE", str(zoo / ".hf-datasets"))
    if table:
        from evomerge.fitness.zoo.table import markdown, score_rows, specialisation_rows

        rows = score_rows(zoo, specialisation_rows(zoo))
        print("\nSpecialisation on the held-out split (exact match):")
        print(markdown(rows))
    print(f"\nzoo: {zoo}")


@app.command("eval")
@user_errors
def eval_cmd(
    model: Path = typer.Option(None, help="A model directory."),
    recipe: Path = typer.Option(None, help="A recipe, merged in memory."),
    tasks: str = typer.Option(..., help="Comma-separated task[:metric[:weight]] list."),
    include: list[Path] = typer.Option([], help="Extra lm-eval task directories."),
    zoo: Path = typer.Option(None, help="Zoo whose tasks are included (default: the demo zoo)."),
    limit: float = typer.Option(None, help="Items per task: a count, or a fraction <= 1."),
    seed: int = typer.Option(0, help="Seed of the --limit subset and few-shot sampling."),
    num_fewshot: int = typer.Option(None),
    batch_size: int = typer.Option(64),
    device: str = typer.Option("cpu"),
    offline: bool = OFFLINE,
):
    """Score one model (or a recipe's merge) and print a table of metrics."""
    set_env(offline)
    from rich.table import Table

    with heavy_imports():
        from evomerge.fitness.models import load_model, model_from_recipe
        from evomerge.fitness.scorer import Scorer
        from evomerge.fitness.tasks import parse_task_list
        from evomerge.fitness.zoo.build import default_zoo_dir
        from evomerge.merge.engine import check_device
        from evomerge.merge.recipe import Recipe

    if (model is None) == (recipe is None):
        raise EvomergeError("give exactly one of --model DIR or --recipe FILE")
    check_device(device)
    if limit is not None and not (limit > 0 and (limit <= 1 or limit == int(limit))):
        raise EvomergeError(f"--limit {limit}: use a count >= 1 or a fraction in (0, 1]")
    for path in include:
        if not path.is_dir():
            raise EvomergeError(f"--include {path}: not a directory of task YAMLs")
    zoo_dir = zoo or default_zoo_dir("demo")
    paths = list(include) + ([zoo_dir / "tasks"] if (zoo_dir / "tasks").is_dir() else [])
    os.environ.setdefault("HF_DATASETS_CACHE", str(zoo_dir / ".hf-datasets"))
    lim = None if limit is None else (int(limit) if limit > 1 else limit)
    scorer = Scorer(
        parse_task_list(tasks),
        include_paths=paths,
        limit=lim,
        seed=seed,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
    )
    m, tok = load_model(model, device) if model else model_from_recipe(Recipe.load(recipe), device)
    result = scorer.bind(m, tok, device).score()
    if not result.ok:
        raise EvomergeError(f"scoring failed: {result.error}")
    t = Table(title=str(model or recipe))
    t.add_column("task")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, value in result.metrics.items():
        name, metric = key.split("/")
        t.add_row(name, metric, f"{value:.4f}")
    from rich.console import Console

    Console().print(t)
    print(f"objective {result.fitness:.4f}  ({result.examples} examples, {result.seconds:.2f} s)")


REPORT_TO_HELP = (
    "Experiment trackers for this session: none, tensorboard, mlflow, wandb, or a "
    "comma-separated list (default: the config's report_to)."
)


def _report_to(value: str | None) -> list[str] | None:
    """--report-to as tracker names (None: not given); a wrong name is one line, exit 2."""
    if value is None:
        return None
    from evomerge.search.config import parse_report_to

    try:
        return parse_report_to(value)
    except ValueError as e:
        raise EvomergeError(f"--report-to: {e}") from None


def _with_workers(cfg, workers: int | None, address: str | None):
    update = {k: v for k, v in (("count", workers), ("address", address)) if v is not None}
    if not update:
        return cfg
    return cfg.model_copy(update={"workers": cfg.workers.model_copy(update=update)})


@app.command()
@user_errors
def search(
    config: Path = typer.Argument(..., help="Search config YAML (see configs/demo.yaml)."),
    run_dir: Path = typer.Option(None, help="Run directory (default: runs/<name>)."),
    workers: int = typer.Option(None, help="Ray workers; 0 runs trials serially in-process."),
    address: str = typer.Option(None, help="Attach to a running Ray cluster (e.g. auto)."),
    check: bool = typer.Option(False, "--check", help="Only validate everything, then exit."),
    report_to: str = typer.Option(None, "--report-to", help=REPORT_TO_HELP),
    offline: bool = OFFLINE,
):
    """Start a search. Config fields: models, base, space (method, layers_per_group,
    embed_head_groups, tensor_kinds, genes, ranges, fixed, normalize, lambda, dtype), fitness
    (tasks, include, limit, num_fewshot, batch_size), cma (sigma0, popsize, budget, seed,
    diagonal_above), workers (count, device, cpus_per_worker, address, trial_timeout), penalty."""
    set_env(offline)
    from evomerge.search.cli.check import check_search_plan, task_code
    from evomerge.search.config import SearchConfig
    from evomerge.search.memory import with_planned_sources
    from evomerge.search.run.rundir import RunDir

    trackers = _report_to(report_to)
    cfg = _with_workers(SearchConfig.load(config), workers, address)
    if trackers is not None:
        cfg = cfg.model_copy(update={"report_to": trackers})
    run_dir = run_dir or Path("runs") / cfg.name
    ensure_zoo(cfg)
    checked = check_search_plan(cfg, run_dir)
    for note in task_code(cfg):
        console.print(f"[bold yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    refuse(checked.problems)  # one line per problem, the memory plan's included
    if check:
        if checked.plan is not None:
            console.print(checked.plan.table())
        console.print(f"{config}: ok (models, genome, tasks, workers, memory, run directory)")
        return
    run = RunDir.create(run_dir, cfg)
    run.config = with_planned_sources(run.config, checked.plan)  # run.yaml keeps auto
    run_and_report(run, trackers)


@app.command()
@user_errors
def resume(
    run_dir: Path = typer.Argument(..., help="A run directory made by evomerge search."),
    config: Path = typer.Option(None, help="Refuse to resume if this config differs."),
    workers: int = typer.Option(None, help="Ray workers (may differ from the first run)."),
    address: str = typer.Option(None, help="Attach to a running Ray cluster."),
    report_to: str = typer.Option(
        None,
        "--report-to",
        help=REPORT_TO_HELP + " Trackers that already hold a run of this search continue it.",
    ),
    offline: bool = OFFLINE,
):
    """Resume a search from its journal; finished trials are never run again."""
    set_env(offline)
    from evomerge.search.cli.check import check_search_plan
    from evomerge.search.config import SearchConfig
    from evomerge.search.memory import with_planned_sources
    from evomerge.search.run.rundir import RunDir

    trackers = _report_to(report_to)
    run = RunDir.reopen(run_dir, SearchConfig.load(config) if config else None)
    run.config = _with_workers(run.config, workers, address)
    ensure_zoo(run.config)
    # resolves the pinned models and loads the tasks here, on the driver: no worker downloads
    checked = check_search_plan(run.config, None)
    refuse(checked.problems)
    run.config = with_planned_sources(run.config, checked.plan)
    run_and_report(run, trackers)


@app.command()
@user_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    out: Path = typer.Option(..., help="Export directory."),
    trial: str = typer.Option(None, help="GENERATION:INDEX to export (default: the best)."),
    top_k: int = typer.Option(1, help="Also score the next best trials on the held-out split."),
    max_shard_size: str = typer.Option("5GB"),
    force: bool = typer.Option(False, "--force"),
    offline: bool = OFFLINE,
):
    """Export a trial: recipe.yaml, mergekit.yaml, the model with its card, held-out table."""
    set_env(offline)
    from evomerge.search.outputs.export import export as do_export
    from evomerge.search.run.rundir import RunDir

    run = RunDir.reopen(run_dir)
    ensure_zoo(run.config)
    run.journal()  # a journal with unreadable lines is read around them: say so first
    warn(run)
    done = do_export(run, out, trial, top_k, max_shard_size, force)
    md = done / "heldout.md"
    if md.exists():
        print(md.read_text())
    console.print(f"exported to {done}")


@app.command()
@user_errors
def report(
    run_dir: Path = typer.Argument(..., help="A run directory (finished or running)."),
    watch: bool = typer.Option(
        False, "--watch", help="Rewrite the report while the run is live; stop when it ends."
    ),
    every: float = typer.Option(30.0, "--every", help="Seconds between rewrites (--watch)."),
):
    """Summaries, plots and an HTML page from the run's journal, into RUN_DIR/report/."""
    with heavy_imports():  # pandas and matplotlib
        from evomerge.search.outputs.report import (
            summarize,
            trials_frame,
            watch_report,
            write_report,
        )
        from evomerge.search.plots import pyplot
        from evomerge.search.run.rundir import RunDir

        pyplot()

    if watch:
        if not every > 0:
            raise EvomergeError(f"--every {every}: give a number of seconds > 0")
        run = RunDir.reopen(run_dir)  # not a run: one line, before any waiting
        # explicit: a background job inherits SIGINT ignored, and the watch would never stop
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            out = watch_report(run, every, log=lambda line: console.print(line))
        except KeyboardInterrupt:
            console.print("stopped watching")
            raise typer.Exit(130) from None
        finally:
            signal.signal(signal.SIGINT, previous)
        console.print(f"report: {out / 'index.html'}")
        return
    run = RunDir.reopen(run_dir)  # its journal parsed once, for the report and the tables
    with heavy_imports():  # the journal's records, kept to the end: out of the GC's rescans
        run.journal()
    df = trials_frame(run)  # built once, for the page and the printed tables
    out = write_report(run, df=df)
    for title, table in summarize(run, df).items():
        print(f"\n{title}\n{table.to_string()}")
    warn(run)
    console.print(f"\nreport: {out / 'index.html'}")


@app.command()
@user_errors
def status(
    run_dirs: list[Path] = typer.Argument(
        None, help="Run directories (default: every directory under runs/)."
    ),
):
    """One row per run: state, evaluations, best, last generation's mean, failures, time, ETA."""
    from rich.console import Console

    from evomerge.search.watch.status import run_status, table

    if not run_dirs:
        root = Path("runs")
        if not root.is_dir():
            raise EvomergeError(
                "no runs/ directory here; give run directories: evomerge status DIR"
            )
        run_dirs = sorted(p for p in root.iterdir() if p.is_dir())
        if not run_dirs:
            raise EvomergeError("runs/ holds no run directories yet")
    out = Console(width=None if sys.stdout.isatty() else 200)  # piped: no wrapped cells
    statuses = []
    for p in run_dirs:
        # the GC off while a journal is read and summed up: its 10,000s of records hold no
        # cycles, and full collections rescanning them were a third of a second at 10,000
        # trials
        with heavy_imports():
            statuses.append(run_status(p))
    out.print(table(statuses))


@app.command()
@user_errors
def demo(
    config: Path = typer.Option(
        None, help="Demo config (default: configs/demo.yaml, the PS demo)."
    ),
    out: Path = typer.Option(None, help="Run directory (default: runs/<config name>)."),
    report_to: str = typer.Option(None, "--report-to", help=REPORT_TO_HELP),
):
    """The main job on the embedded default: a search over the tiny zoo, on this machine, then
    held-out scores beside the parents'. Re-running resumes (or just reports) the same run."""
    set_env(True)
    from evomerge.search.cli.demo import DEMO_CONFIG, run_demo
    from evomerge.search.config import SearchConfig

    trackers = _report_to(report_to)
    config = config or DEMO_CONFIG
    run_demo(out or Path("runs") / SearchConfig.load(config).name, config, trackers)


def main() -> None:  # pragma: no cover - entry for `python -m evomerge.search.cli.main`
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
