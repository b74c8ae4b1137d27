"""Model references: a local directory, a Hugging Face hub ID, or a hub ID at a revision.

    /models/base              a local directory (used as it is)
    org/name                  the hub's default branch, pinned to its commit when resolved
    org/name@revision         a branch, a tag or a commit (mergekit's convention)

Pinning and who downloads: docs/ARCHITECTURE.md, "Models and tasks from the hub".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from evomerge.merge.errors import EvomergeError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
# what a merge or a scorer reads; never pickle weights (the safetensors are enough) or other blobs
WANTED = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class Resolved:
    local: Path  # the directory to read
    pinned: str  # the reference to record: org/name@<commit>, or the local directory


_cache: dict[tuple[str, str | None], Resolved] = {}
_settings: dict = {"downloads": True, "cache_dir": None}


def forbid_downloads() -> None:
    """From now on, this process resolves hub references from the cache only (search workers)."""
    _settings["downloads"] = False


def use_cache(cache_dir: str | None) -> None:
    """Where this process finds and puts hub snapshots (None: the Hugging Face default, which
    HF_HOME and HF_HUB_CACHE set); on a cluster, shared storage every node reads."""
    _settings["cache_dir"] = cache_dir


def is_hub_ref(ref: str) -> bool:
    """A hub ID (`org/name[@revision]`) that is not also an existing local path."""
    return bool(_HUB_ID.match(ref)) and not Path(ref).expanduser().exists()


def split_ref(ref: str) -> tuple[str, str | None]:
    repo, _, revision = ref.partition("@")
    return repo, revision or None


def resolve(ref: str, label: str = "model") -> Resolved:
    """The local directory of a reference and the reference pinned to its commit; a local path
    comes back as it is (absolute)."""
    if not is_hub_ref(ref):
        local = Path(ref).expanduser()
        return Resolved(local, str(local.resolve()) if local.exists() else ref)
    cache_dir = _settings["cache_dir"]
    key = (ref, cache_dir)
    if key not in _cache:
        _cache[key] = _snapshot(ref, cache_dir, label)
    return _cache[key]


def _snapshot(ref: str, cache_dir: str | None, label: str) -> Resolved:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision = split_ref(ref)
    where = cache_dir or "the Hugging Face cache"
    try:
        local = snapshot_download(
            repo,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=WANTED,
            local_files_only=not _settings["downloads"],
        )
    except RevisionNotFoundError:
        raise EvomergeError(
            f"{label}: {ref}: the hub has no revision {revision!r} of {repo}; pin another"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):
        raise EvomergeError(
            f"{label}: {ref}: no such model on the hub, or it needs a token you have not given "
            "(huggingface-cli login or HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError:
        raise EvomergeError(
            f"{label}: {ref} is not in {where} and the hub cannot be reached (offline, or no "
            "network); download it where the hub is reachable, or point cache_dir at a copy"
        ) from None
    except (OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EvomergeError(f"{label}: {ref}: cannot resolve ({first})") from None
    commit = Path(local).name  # snapshots/<commit>
    if not COMMIT.match(commit):
        raise EvomergeError(f"{label}: {ref} resolved to {local}, not a cache snapshot")
    return Resolved(Path(local), f"{repo}@{commit}")
