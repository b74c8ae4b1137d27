"""Worker start-up: the resident sources read on several threads (merge.resident.Loader) hold
the checkpoints' bytes exactly, whatever the thread count and piece size, and a damaged or
truncated checkpoint is named as the one-tensor-at-a-time reader names it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.merge import resident
from evomerge.merge.errors import EvomergeError
from evomerge.merge.io import safetensors_io
from evomerge.merge.io.checkpoint import Checkpoint
from evomerge.merge.io.safetensors_io import all_finite
from evomerge.merge.placement import Placement
from evomerge.merge.resident import ResidentSources
from evomerge.merge.synthetic import make_family

PIECE = 1000  # bytes (a multiple of every element size): most tensors span several pieces,
# most with a ragged last one


@pytest.fixture(scope="module")
def bf16_sharded(tmp_path_factory):
    return make_family(
        tmp_path_factory.mktemp("bf16"), "llama", experts=2, dtype=torch.bfloat16, shards=3
    )


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _stored(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", ["llama_family", "bf16_sharded"])
@pytest.mark.parametrize("where", ["device", "host"])
def test_threaded_load_is_the_files_bytes_whatever_the_threads(request, family, where, monkeypatch):
    paths = request.getfixturevalue(family)
    monkeypatch.setattr(resident, "PIECE", PIECE)
    loads = {n: ResidentSources(paths, "base", "cpu", where, load_threads=n) for n in (1, 3)}
    for alias, path in paths.items():
        want = _stored(path)
        for n, sources in loads.items():
            got = sources.models[alias].tensors
            assert got.keys() == want.keys()
            for name, t in want.items():
                g = got[name]
                assert g.device.type == "cpu" and g.dtype == t.dtype and g.shape == t.shape
                assert torch.equal(_bits(g), _bits(t)), (n, alias, name)
    pieces = sum(
        -(-t.numel() * t.element_size() // PIECE) for t in loads[3].models["base"].tensors.values()
    )
    assert pieces > 2 * len(loads[3].models["base"].names)  # the tensors really were split


def test_load_stats_count_every_byte_once(bf16_sharded):
    sources = ResidentSources(bf16_sharded, "base", "cpu", load_threads=2)
    stats = sources.load_stats
    assert stats.bytes == sources.nbytes() > 0
    files = sum(f.stat().st_size for p in bf16_sharded.values() for f in p.glob("*.safetensors"))
    assert stats.bytes < files  # the tensors' bytes, not the headers
    assert stats.seconds > 0 and stats.gb_per_s == stats.bytes / stats.seconds / 1e9
    assert stats.threads == 2 and not stats.staged
    assert json.loads(json.dumps(stats.as_dict()))["bytes"] == stats.bytes


def _damage(src, dest, values: dict[str, tuple[int, float]]):
    """A copy of model directory `src` in `dest` with entry i of each named tensor set."""
    dest.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            dest.joinpath(f.name).write_bytes(f.read_bytes())
            continue
        state = load_file(f)
        for name, (i, value) in values.items():
            if name in state:
                state[name].view(-1)[i] = value
        save_file(state, dest / f.name, metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("threads", [1, 3])
def test_non_finite_source_is_named_first_in_network_order(
    tmp_path, bf16_sharded, threads, monkeypatch
):
    monkeypatch.setattr(resident, "PIECE", PIECE)
    ckpt = Checkpoint(bf16_sharded["expert1"])
    big = [n for n in ckpt.names if math.prod(ckpt.shape(n)) * 2 > 3 * PIECE]
    early, late = big[0], big[-1]  # both span several pieces: the bad entry in the last
    last = {n: math.prod(ckpt.shape(n)) - 1 for n in (early, late)}
    bad = _damage(
        bf16_sharded["expert1"],
        tmp_path / "bad",
        {late: (last[late], float("inf")), early: (last[early], float("nan"))},
    )
    paths = {**bf16_sharded, "expert1": bad}
    with pytest.raises(EvomergeError) as e:
        ResidentSources(paths, "base", "cpu", load_threads=threads)
    assert str(e.value) == (
        f"models.expert1: tensor {early!r} in {bad} holds NaN or inf values; the checkpoint is "
        "damaged: re-download or re-save it"
    )
    # the reader a merge from disk uses says the same
    with pytest.raises(EvomergeError) as direct:
        Checkpoint(bad, label="models.expert1").get(early)
    assert str(direct.value) == str(e.value)


def test_file_truncated_after_its_header_was_read_is_named(tmp_path, llama_family, monkeypatch):
    monkeypatch.setattr(resident, "PIECE", PIECE)
    copy = tmp_path / "expert2"
    copy.mkdir()
    for f in llama_family["expert2"].iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    ckpt = Checkpoint(copy, label="models.expert2")
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    with pytest.raises(EvomergeError, match=r"model\.safetensors: truncated while reading"):
        resident.ResidentModel(ckpt, Placement(("cpu",), ckpt.info.num_layers), "device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_is_isfinite_all(dtype, monkeypatch):
    """The exponent-bit check against torch's isfinite: on the edge values of each format (the
    largest finite, subnormals, -0), on NaN and both infinities, in every chunk position."""
    monkeypatch.setattr(safetensors_io, "_CHECK_CHUNK", 7)
    info = torch.finfo(dtype)
    edges = [0.0, -0.0, 1.0, -2.5, info.max, -info.max, info.tiny, info.tiny / 4, info.eps]
    good = torch.tensor(edges * 5, dtype=dtype)
    assert all_finite(good) and bool(torch.isfinite(good).all())
    for special in (float("nan"), float("inf"), float("-inf")):
        for i in (0, 6, 7, 30, good.numel() - 1):  # chunk starts and ends, the ragged tail
            t = good.clone()
            t[i] = special
            assert not all_finite(t), (special, i)
            assert not all_finite(t.reshape(5, -1))
    assert all_finite(torch.empty(0, dtype=dtype))
    assert all_finite(torch.arange(10))  # integers hold no NaN
