"""Streaming safetensors I/O: lazy reads, streamed shards, corrupt files named."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.merge.errors import EvomergeError
from evomerge.merge.io.checkpoint import Checkpoint
from evomerge.merge.io.files import staged_dir
from evomerge.merge.io.safetensors_io import (
    ShardWriter,
    TensorSpec,
    plan_shards,
    read_header,
    read_tensor,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
    }


def test_reader_matches_safetensors(tmp_path):
    ts = _tensors()
    save_file(ts, tmp_path / "x.safetensors")
    entries = read_header(tmp_path / "x.safetensors")
    for name, t in ts.items():
        got = read_tensor(entries[name])
        assert got.dtype == t.dtype and torch.equal(got, t)


def test_writer_output_loads_with_safetensors(tmp_path):
    ts = _tensors()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in ts.items()]
    w = ShardWriter(tmp_path / "y.safetensors", specs)
    for n, t in ts.items():
        w.write(n, t)
    w.close()
    back = load_file(tmp_path / "y.safetensors")
    assert set(back) == set(ts) and all(torch.equal(back[n], ts[n]) for n in ts)


def test_writer_refuses_out_of_order(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]
    w = ShardWriter(tmp_path / "z.safetensors", specs)
    with pytest.raises(ValueError):
        w.write("b", torch.zeros(2))


def test_plan_shards_respects_limit():
    specs = [TensorSpec(str(i), torch.float32, (100,)) for i in range(10)]  # 400 bytes each
    shards = plan_shards(specs, 1000)
    assert [len(s) for s in shards] == [2, 2, 2, 2, 2]
    assert len(plan_shards([TensorSpec("big", torch.float32, (1000,))], 10)) == 1


@pytest.mark.parametrize("cut", [4, 40, -10])
def test_truncated_file_is_named(tmp_path, cut):
    save_file(_tensors(), tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:cut])
    with pytest.raises(EvomergeError, match=r"t\.safetensors.*(truncated|corrupt)"):
        read_header(tmp_path / "t.safetensors")


def test_garbage_header_is_named(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"0" * 64
    )
    with pytest.raises(EvomergeError, match="corrupt safetensors header"):
        read_header(tmp_path / "g.safetensors")


def test_sharded_checkpoint_reads_lazily(tmp_path, llama_family):
    """Opening a checkpoint reads headers only, and a tensor is read from its own bytes only:
    with one shard's tensor data overwritten by garbage, every tensor of the other shards
    still reads back exactly (and the garbage shard's tensors come back as garbage)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_family["base"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    victim = tmp_path / "sharded" / shards[1]
    (header_len,) = struct.unpack("<Q", victim.read_bytes()[:8])
    data_start = 8 + header_len
    with open(victim, "r+b") as f:  # garbage in every tensor byte, headers untouched
        f.seek(data_start)
        f.write(b"\x7f" * (victim.stat().st_size - data_start))
    ck, ref = Checkpoint(tmp_path / "sharded"), Checkpoint(llama_family["base"])
    assert sorted(ck.names) == sorted(ref.names)
    in_victim = {n for n, f in index["weight_map"].items() if f == shards[1]}
    assert in_victim and all(not torch.equal(ck.get(n), ref.get(n)) for n in in_victim)
    assert all(torch.equal(ck.get(n), ref.get(n)) for n in ref.names if n not in in_victim)


def test_staged_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_dir(out) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("direct", [True, False])
def test_direct_and_buffered_shards_are_the_same_bytes(tmp_path, monkeypatch, direct):
    """O_DIRECT writes (staged, last block padded, file truncated) give the buffered file."""
    from evomerge.merge.io import safetensors_io

    monkeypatch.setattr(safetensors_io, "DIRECT_IO", direct)
    monkeypatch.setattr(safetensors_io._StreamFile, "STAGE", 8192)  # tensors span stages
    g = torch.Generator().manual_seed(1)
    ts = {"a": torch.randn(3001, generator=g), "b": torch.randn(7, generator=g).bfloat16()}
    ts["c"] = torch.randn(5000, generator=g)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in ts.items()]
    w = ShardWriter(tmp_path / "d.safetensors", specs)
    for n, t in ts.items():
        w.write(n, t)
    w.close()
    back = load_file(tmp_path / "d.safetensors")
    assert all(torch.equal(back[n], ts[n]) for n in ts)
    size = (tmp_path / "d.safetensors").stat().st_size
    header = read_header(tmp_path / "d.safetensors")
    assert size == max(e.end for e in header.values())  # no padding left at the end


def test_mapped_tensor_matches_read_and_truncation_is_named(tmp_path):
    from evomerge.merge.io.safetensors_io import map_tensor

    ts = _tensors()
    save_file(ts, tmp_path / "x.safetensors")
    entries = read_header(tmp_path / "x.safetensors")
    for name, t in ts.items():
        got = map_tensor(entries[name])
        assert got is None if t.numel() == 0 else torch.equal(got, t)
    last = max(entries.values(), key=lambda e: e.end)
    with open(tmp_path / "x.safetensors", "r+b") as f:  # truncated after the header was read
        f.truncate(last.begin + 2)
    with pytest.raises(EvomergeError, match="truncated"):
        map_tensor(last)


def test_buffer_pool_reuses_buffers_and_keeps_a_bounded_amount():
    from evomerge.merge.io.safetensors_io import BufferPool

    pool = BufferPool(keep=3000)
    a = pool.take(1000)
    ptr = a.data_ptr()
    pool.give(a.view(torch.float32).reshape(10, 25))  # a view of the whole buffer
    b = pool.take(1000)
    assert b.data_ptr() == ptr and b.numel() == 1000 and b.dtype == torch.uint8
    for _ in range(5):
        pool.give(torch.empty(1000, dtype=torch.uint8))
    assert pool._bytes <= 3000
