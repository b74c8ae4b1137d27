"""Files that readers never see half-written (every file evomerge writes), and strict YAML."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import yaml

from evomerge.merge.errors import EvomergeError


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file so that readers see the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_dir(out: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out`, renamed into place only if the block completes.

    `replace` lets an existing `out` be replaced; whether it may be is the caller's decision
    (`guard_output`): this function only refuses to replace what is not a directory.
    """
    out = Path(out)
    if out.exists() and not replace:
        raise EvomergeError(f"{out}: exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise EvomergeError(f"{out}: is a file, not a directory; choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps
    the last silently, so a config's second `budget:` would quietly win)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            line = key_node.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"key {key!r} appears twice (line {line}); keep one",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_yaml(path: Path, what: str) -> object:
    """Parse a YAML file safely (no tags that build objects, no duplicate keys)."""
    path = Path(path)
    if path.is_dir():
        raise EvomergeError(f"{path}: is a directory, not a {what} file")
    if not path.is_file():
        raise EvomergeError(f"{path}: {what} file not found")
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        raise EvomergeError(f"{path}: not a text file; give a YAML {what}") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0]
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or first
        raise EvomergeError(f"{path}: not valid YAML{where}: {problem}") from None


MARKER = ".evomerge"  # in every directory an evomerge command writes: {"written_by": <command>}


def written_by(path: Path) -> str | None:
    """The evomerge command that wrote directory `path`, or None."""
    import json

    marker = Path(path) / MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text()).get("written_by"))
        except (ValueError, AttributeError):
            return None
    if (Path(path) / "evomerge_recipe.yaml").is_file():  # a model merged before markers existed
        return "merge"
    return None


def write_marker(path: Path, command: str) -> None:
    import json

    write_atomic(Path(path) / MARKER, json.dumps({"written_by": command}) + "\n")


def guard_output(out: Path, inputs: list[Path], command: str, force: bool) -> None:
    """Refuse an output path whose replacement would destroy what this command did not write.

    OUT may not be, contain or lie inside any input (a source model, a run directory, the
    recipe). An existing OUT is replaced only with --force, and only if it is empty or this
    evomerge command wrote it (its marker says so): anything else is the user's to remove."""
    target = Path(out).expanduser().resolve()
    for given in inputs:
        p = Path(given).expanduser().resolve()
        if target == p or target in p.parents:
            how = "is" if target == p else "contains"
            raise EvomergeError(
                f"{out}: {how} the input {given}; choose an output path outside the inputs"
            )
        if p in target.parents:
            raise EvomergeError(
                f"{out}: lies inside the input {given}; choose an output path outside the inputs"
            )
    blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise EvomergeError(f"{out}: {blocking} is a file, not a directory; fix the output path")
    if not target.exists():
        return
    if not target.is_dir():
        raise EvomergeError(f"{out}: is a file, not a directory; choose another output path")
    if not force:
        raise EvomergeError(f"{out}: exists; pass --force to replace it")
    if any(target.iterdir()) and written_by(target) != command:
        raise EvomergeError(
            f"{out}: exists and was not written by evomerge {command}; --force replaces only "
            "evomerge's own output: remove it yourself or choose another path"
        )
