"""The memory plan (search/memory.py) and `evomerge search --check` enforcing it.

The 7B and 70B families are header-only checkpoints: a real config.json and safetensors header,
the data region a sparse file (no disk used). Reading any tensor's bytes fails the test, so the
plan is shown to need the headers alone."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from evomerge.merge.engine import READ_AHEAD
from evomerge.merge.io.checkpoint import Checkpoint
from evomerge.merge.synthetic import make_family
from evomerge.search.cli.check import _check_workers, check_search_plan
from evomerge.search.cli.main import app
from evomerge.search.config import SearchConfig
from evomerge.search.memory import GPU_RESERVE, SequenceLength, choose_sources, plan_memory
from tests.conftest import search_config

runner = CliRunner()

MISTRAL_7B = dict(
    model_type="mistral",
    architectures=["MistralForCausalLM"],
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LLAMA3_70B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
_CODES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def _shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The tensors of a Llama-layout checkpoint (Mistral's too), as transformers names them."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (v, h)
    return out


def header_only(out: Path, cfg: dict, dtype: torch.dtype, tokenizer_from: Path) -> Path:
    """A model directory whose model.safetensors is a real header over a sparse data region."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(
        json.dumps({**cfg, "torch_dtype": str(dtype).removeprefix("torch.")})
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_from / name, out / name)
    header, offset = {}, 0
    for name, shape in _shapes(cfg).items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data region starts 8-byte aligned
    path = out / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
    os.truncate(path, 8 + len(text) + offset)
    return out


def family(root: Path, cfg: dict, dtype: torch.dtype, experts: int, zoo: Path) -> dict[str, Path]:
    tok = zoo / "llama" / "base"
    names = ["base", *(f"expert{i}" for i in range(1, experts + 1))]
    return {a: header_only(root / a, cfg, dtype, tok) for a in names}


@pytest.fixture(autouse=True)
def _no_gpu_no_reads(monkeypatch):
    """The plans below are the declared GPUs', whatever this machine has; and the checks may
    read headers only: a tensor's bytes (a sparse file's zeros) are never read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)

    def refuse(*args, **kwargs):
        raise AssertionError("the memory plan read a tensor's data")

    monkeypatch.setattr("evomerge.merge.io.checkpoint.read_tensor", refuse)
    monkeypatch.setattr("evomerge.merge.io.checkpoint.map_tensor", refuse)


@pytest.fixture(scope="module")
def fams(tmp_path_factory, tiny_zoo):
    root = tmp_path_factory.mktemp("headers")
    return {
        "7b-fp32": family(root / "7b-fp32", MISTRAL_7B, torch.float32, 2, tiny_zoo),
        "7b-bf16": family(root / "7b-bf16", MISTRAL_7B, torch.bfloat16, 2, tiny_zoo),
        "70b-bf16": family(root / "70b-bf16", LLAMA3_70B, torch.bfloat16, 3, tiny_zoo),
    }


def _config(zoo: Path, models: dict[str, Path], **workers) -> dict:
    data = search_config(zoo).dump()
    data["models"] = {a: {"path": str(p)} for a, p in models.items()}
    data["workers"] = {"count": 0, **workers}
    data["space"]["layers_per_group"] = 8  # a genome small enough for the check's budget
    return data


def _check(tmp_path: Path, data: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return runner.invoke(app, ["search", str(path), "--check", "--run-dir", str(tmp_path / "run")])


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_header_only_checkpoints_open_without_their_data(fams):
    path = fams["7b-bf16"]["base"]
    ckpt = Checkpoint(path)  # the autouse fixture fails any read of tensor bytes
    assert len(ckpt.names) == 3 + 9 * 32
    assert ckpt.dtype("lm_head.weight") == torch.bfloat16
    assert ckpt.shape("model.layers.0.self_attn.k_proj.weight") == (1024, 4096)
    file = path / "model.safetensors"
    assert file.stat().st_size > 14 * 10**9  # 7.24B parameters in bf16
    assert file.stat().st_blocks * 512 < 10**6  # sparse: the data region takes no disk


def test_7b_fp32_on_device_is_refused_naming_the_sources(fams, tiny_zoo, tmp_path):
    data = _config(tiny_zoo, fams["7b-fp32"], sources="device", gpu_memory="80GB")
    result = _check(tmp_path, data)
    assert result.exit_code == 2, result.output
    errors = _errors(result.output)
    assert len(errors) == 1, result.output
    line = errors[0]
    assert "a worker needs" in line and "on cuda:0" in line and "against 80.0 GB" in line
    assert "the largest part is the sources" in line
    # either fix really fits: host sources, or two GPUs for the layers
    assert "set workers.sources: host or workers.gpus_per_worker: 2" in line
    assert "ok (models" not in result.output


def test_7b_bf16_on_device_is_accepted_and_prints_the_plan(fams, tiny_zoo, tmp_path):
    data = _config(tiny_zoo, fams["7b-bf16"], sources="device", gpu_memory="80GB")
    result = _check(tmp_path, data)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Memory plan, per worker: parameter space" in out
    assert "sources on device" in out and "candidate bfloat16" in out
    assert "the tasks' longest request" in out  # measured, not the default
    assert "80.0 GB (workers.gpu_memory)" in out
    flat = " ".join(out.split())  # rich wraps at the terminal's width
    assert flat.index("Memory plan") < flat.index("ok (models, genome, tasks, workers, memory")
    # three bf16 copies of 7.24B parameters on the one GPU
    assert "43.5 GB" in out


def test_70b_over_8_gpus_fits_with_host_sources_not_on_device(fams, tiny_zoo):
    data = _config(
        tiny_zoo,
        fams["70b-bf16"],
        sources="host",
        gpus_per_worker=8,
        gpu_memory="80GB",
        host_memory="2000GB",
    )
    data["fitness"]["batch_size"] = 16
    checked = check_search_plan(SearchConfig.parse(data), None)
    assert checked.problems == [], checked.problems
    plan = checked.plan
    assert plan is not None and plan.sources == "host"
    totals = plan.gpu_totals()
    assert list(totals) == [f"cuda:{i}" for i in range(8)]
    assert all(0 < t < 80 * 10**9 for t in totals.values()), totals
    # the sources sit in host memory (4 bf16 models of ~70.6B parameters), a window on each GPU
    assert 560 * 10**9 < plan.host_per_worker() < 570 * 10**9
    assert all(plan.bytes_of(d, "sources") == 0 for d in totals)
    assert all(plan.bytes_of(d, "sources window") > READ_AHEAD for d in totals)
    # embeddings on the first GPU, the head (and its logits) on the last
    assert plan.bytes_of("cuda:0", "candidate") > plan.bytes_of("cuda:3", "candidate")
    assert plan.bytes_of("cuda:7", "logits") > 0 and plan.bytes_of("cuda:0", "logits") == 0

    on_device = SearchConfig.parse({**data, "workers": {**data["workers"], "sources": "device"}})
    checked = check_search_plan(on_device, None)
    assert len(checked.problems) == 1, checked.problems
    line = checked.problems[0]
    assert line.startswith("memory: a worker needs") and "against 80.0 GB" in line
    assert "the largest part is the sources: set workers.sources: host" in line


def test_without_the_tasks_the_plan_states_its_default_and_refuses_only_what_never_fits(
    fams, tiny_zoo, tmp_path
):
    def checked(fam: str, batch: int):
        data = _config(tiny_zoo, fams[fam], sources="device", gpu_memory="80GB")
        data["fitness"]["include"].append(str(tmp_path / "missing"))  # no task loads
        data["fitness"]["batch_size"] = batch
        return check_search_plan(SearchConfig.parse(data), None)

    # the sources alone do not fit: refused along with the tasks
    result = checked("7b-fp32", 16)
    assert len(result.problems) == 2, result.problems
    assert "is not a directory of task YAMLs" in result.problems[0]
    assert "the largest part is the sources" in result.problems[1]
    assert result.plan is not None
    assert "default: the tasks did not load" in result.plan.sequence.note
    # at the default 2048 tokens a batch of 256 would not fit, but that length is a guess
    result = checked("7b-bf16", 256)
    assert result.plan is not None and not result.plan.fits_gpus()
    assert len(result.problems) == 1 and "task YAMLs" in result.problems[0]


def _tiny_config(paths: dict[str, Path], **workers) -> SearchConfig:
    return SearchConfig.parse(
        {
            "models": {a: {"path": str(p)} for a, p in paths.items()},
            "base": "base",
            "space": {"method": "ties", "dtype": "bfloat16"},
            "fitness": {"tasks": [{"name": "x"}], "batch_size": 4},
            "workers": workers,
        }
    )


def test_plan_arithmetic_on_a_tiny_family(tmp_path):
    # Llama, hidden 32, 2 layers, 4 heads of 8, 2 KV heads, intermediate 64, vocab 128, untied,
    # max_position_embeddings 64; stored in fp32, merged to bf16
    paths = make_family(tmp_path, "llama", experts=2)
    cfg = _tiny_config(paths, sources="device", gpus_per_worker=2, gpu_memory="1GB")
    plan = plan_memory(cfg, SequenceLength(100, "test"))  # capped at the model's 64 tokens
    assert plan.setting.tokens == 64
    embed = head = 128 * 32
    layer = 32 * 32 + 16 * 32 + 16 * 32 + 32 * 32 + 3 * 64 * 32 + 2 * 32
    norm = 32
    # layer 0 and the embeddings on cuda:0; layer 1, the final norm and the head on cuda:1
    first, last = embed + layer, layer + norm + head
    kv = 4 * 64 * 1 * (2 * 2 * 8) * 2  # batch x tokens x layers x 2 x KV heads x head dim x bf16
    expect = {
        ("sources", "cuda:0"): 3 * first * 4,
        ("candidate", "cuda:0"): first * 2,
        ("merge temporaries", "cuda:0"): (3 + 2) * embed * 4,
        ("KV cache", "cuda:0"): kv,
        ("reserve", "cuda:0"): GPU_RESERVE,
        ("sources", "cuda:1"): 3 * last * 4,
        ("candidate", "cuda:1"): last * 2,
        ("merge temporaries", "cuda:1"): (3 + 2) * head * 4,
        ("KV cache", "cuda:1"): kv,
        ("logits", "cuda:1"): 4 * 64 * 128 * 4 * 2,
        ("reserve", "cuda:1"): GPU_RESERVE,
    }
    assert {(r.part, r.where): r.nbytes for r in plan.rows} == expect
    assert plan.gpu_totals()["cuda:0"] == sum(v for (_, w), v in expect.items() if w == "cuda:0")
    assert plan.host_per_worker() == 0

    host = plan.replan(sources="host")
    assert host.bytes_of("host", "sources") == 3 * (first + last) * 4
    assert host.bytes_of("cuda:0", "sources window") == READ_AHEAD + 3 * embed * 4
    assert host.bytes_of("cuda:0", "sources") == 0

    # one GPU: everything on it, the head's logits too; a CPU worker holds it all in memory
    one = plan.replan(gpus=1)
    assert one.bytes_of("cuda:0", "KV cache") == 2 * kv
    assert one.bytes_of("cuda:0", "sources") == 3 * (first + last) * 4
    cpu = plan_memory(_tiny_config(paths, device="cpu", count=1), SequenceLength(10, "test"))
    assert cpu.devices == ("cpu",) and cpu.gpu_totals() == {}
    assert cpu.host_per_worker() == sum(r.nbytes for r in cpu.rows)
    assert cpu.bytes_of("cpu", "reserve") == 0


def test_a_data_flow_plan_counts_its_path_models_whole_on_the_first_gpu(tmp_path):
    paths = make_family(tmp_path, "llama", experts=2)
    cfg = SearchConfig.parse(
        {
            **_tiny_config(paths, gpus_per_worker=2, gpu_memory="2GB").dump(),
            "dfs": {"models": ["expert1", "expert2"], "embed_from": "expert1", "repeats": 2},
        }
    )
    plan = plan_memory(cfg, SequenceLength(10, "test"))
    model = (2 * 128 * 32 + 2 * (32 * 32 * 2 + 16 * 32 * 2 + 3 * 64 * 32 + 2 * 32) + 32) * 2
    hops = 2 * (2 + 2) + 2  # every layer of both models twice, and the first and last again
    assert {(r.part, r.where): r.nbytes for r in plan.rows} == {
        ("sources", "cuda:0"): 2 * model,  # the two path models in bf16, nothing merged
        ("KV cache", "cuda:0"): 4 * 10 * hops * (2 * 2 * 8) * 2,
        ("logits", "cuda:0"): 4 * 10 * 128 * 4 * 2,
        ("reserve", "cuda:0"): GPU_RESERVE,
        ("reserve", "cuda:1"): GPU_RESERVE,
    }
    assert plan.problem() is None


def test_problem_names_the_largest_part_and_a_fix_that_fits(tmp_path):
    paths = make_family(tmp_path, "llama", experts=2)
    cfg = _tiny_config(paths, sources="device", gpu_memory="1GB")
    plan = plan_memory(cfg, SequenceLength(64, "test"))
    assert plan.problem() is not None and "reserve" in plan.problem()  # 1 GiB > 1 GB
    roomy = _tiny_config(paths, sources="device", gpu_memory="2GB")
    plan = plan_memory(roomy, SequenceLength(64, "test"))
    assert plan.problem() is None
    # scoring at a huge batch: the logits are the largest part, and the batch that fits named
    big = plan.replan(batch=65536)
    line = big.problem()
    assert line is not None and "the largest part is the logits" in line
    batch = int(line.rsplit("fitness.batch_size: ", 1)[1])
    assert big.replan(batch=batch).problem() is None and big.replan(batch=2 * batch).problem()


def test_choose_sources_auto_picks_device_when_it_fits_else_host(fams, tiny_zoo):
    def config(sources):
        data = _config(tiny_zoo, fams["7b-bf16"], sources=sources)
        data["fitness"]["batch_size"] = 16
        return SearchConfig.parse(data)

    auto = config("auto")
    # 3 x 14.5 GB of sources, a 14.5 GB candidate: device on an 80 GB GPU, host on a 48 GB one
    assert choose_sources(auto, 80 * 10**9, sequence=512) == "device"
    assert choose_sources(auto, 48 * 10**9, sequence=512) == "host"
    assert choose_sources(config("device"), 48 * 10**9) == "device"  # as configured
    assert choose_sources(config("host"), 80 * 10**9) == "host"
    assert choose_sources(auto, None) == "device"  # a CPU worker
    # the driver resolves auto the same way, and says why
    data = _config(tiny_zoo, fams["7b-bf16"], sources="auto", gpu_memory="48GB")
    data["fitness"]["batch_size"] = 16
    plan = plan_memory(SearchConfig.parse(data), SequenceLength(512, "test"))
    assert plan.sources == "host" and "would need" in plan.auto_note


def test_more_gpus_per_worker_than_visible_is_refused(monkeypatch, tiny_zoo):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = search_config(tiny_zoo, workers={"gpus_per_worker": 4})
    assert _check_workers(cfg) == [
        "workers.gpus_per_worker: 4, but this machine has 2 GPUs; lower it to 2 or fewer"
    ]
    assert _check_workers(search_config(tiny_zoo, workers={"gpus_per_worker": 2})) == []


def test_longest_request_is_the_longest_a_worker_builds(tiny_zoo):
    """Measured on the driver without a model, it matches what a bound Scorer (a worker's)
    builds and lm-eval tokenizes, to the BOS token it may add."""
    from evomerge.fitness.models import load_model
    from evomerge.fitness.scorer import Scorer

    cfg = search_config(tiny_zoo)
    fc = cfg.fitness
    scorer = Scorer(fc.tasks, include_paths=cfg.include_paths(), limit=fc.limit, seed=3)
    model, tokenizer = load_model(tiny_zoo / "llama" / "base")
    longest, generated = scorer.longest_request(tokenizer)
    scorer.bind(model, tokenizer)

    def text(inst) -> str:  # what the model reads: a prompt, or a context and its continuation
        return inst.args[0] if inst.request_type == "generate_until" else "".join(inst.args[:2])

    lengths = [
        len(scorer.lm.tok_encode(text(inst)))
        for built in scorer.requests["search"]
        for instances in built.by_doc.values()
        for inst in instances
    ]
    assert max(lengths) <= longest <= max(lengths) + 1
    assert generated == 10  # the zoo's generation tasks' max_gen_toks


def test_the_gpus_the_driver_sees_are_the_capacity(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from evomerge.search.memory import Capacity

    gpus = [
        SimpleNamespace(name="H100", total_memory=85 * 10**9),
        SimpleNamespace(name="A100", total_memory=42 * 10**9),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: gpus[i])
    paths = make_family(tmp_path, "llama", experts=2)
    cfg = _tiny_config(paths, gpu_memory="1GB", host_memory="100GB")  # what the driver sees wins
    capacity = Capacity.detect(cfg)
    assert capacity.gpu == 42 * 10**9 and capacity.gpus_visible == 2
    assert capacity.gpu_from == "cuda:1, A100, the smallest of 2"
    assert capacity.host == 100 * 10**9  # declared host memory is the node's
    plan = plan_memory(cfg, SequenceLength(8, "test"))
    assert plan.devices == ("cuda:0",) and plan.workers_per_node == 2  # one worker per GPU
    cpu = plan_memory(_tiny_config(paths, device="cpu"), SequenceLength(8, "test"))
    assert cpu.capacity.gpu is None and cpu.devices == ("cpu",)


def test_workers_are_handed_the_drivers_choice_of_sources(fams, tiny_zoo):
    """With the GPUs' memory known, the driver resolves auto (it measured the tasks; a worker
    would size the KV cache at the default length) and the workers get device or host; with
    nothing known, auto goes on to the workers, who see their own GPU."""
    from evomerge.search.memory import with_planned_sources

    for memory, want in (("80GB", "device"), ("48GB", "host")):
        data = _config(tiny_zoo, fams["7b-bf16"], sources="auto", gpu_memory=memory)
        data["fitness"]["batch_size"] = 16
        config = SearchConfig.parse(data)
        plan = plan_memory(config, SequenceLength(512, "test"))
        handed = with_planned_sources(config, plan)
        assert handed.workers.sources == want
        assert handed.digest() == config.digest()  # a worker setting: the run is the same run
    unknown = SearchConfig.parse(_config(tiny_zoo, fams["7b-bf16"], sources="auto"))
    assert with_planned_sources(unknown, plan_memory(unknown)).workers.sources == "auto"


def test_elementwise_methods_plan_one_chunks_temporaries(fams, tiny_zoo):
    """Task arithmetic (and linear, DARE with counter masks) merge a chunk at a time on a GPU:
    their fp32 temporaries are a chunk's, where TIES needs its largest tensor's whole (on a 70B
    embedding, 25 GB)."""
    from evomerge.merge.ops.fused import GPU_CHUNK

    def plan(method: str, masks: str = "counter"):
        data = _config(
            tiny_zoo, fams["70b-bf16"], sources="host", gpus_per_worker=8, gpu_memory="80GB"
        )
        data["space"].update(method=method, masks=masks)
        return plan_memory(SearchConfig.parse(data), SequenceLength(64, "test"))

    chunk = (4 + 2) * GPU_CHUNK * 4  # base + 3 experts, two more, fp32
    for method in ("task_arithmetic", "linear", "dare_ties"):
        assert plan(method).bytes_of("cuda:0", "merge temporaries") == chunk, method
    whole = plan("ties").bytes_of("cuda:0", "merge temporaries")
    assert whole == 6 * 128256 * 8192 * 4  # the embedding, whole
    assert plan("dare_ties", masks="torch").bytes_of("cuda:0", "merge temporaries") == whole


def _vllm(data: dict, **fitness) -> SearchConfig:
    data["fitness"] |= {"backend": "vllm", **fitness}
    return SearchConfig.parse(data)


def test_a_vllm_worker_plans_its_engine_not_an_eval_model(fams, tiny_zoo, capsys):
    """fitness.backend: vllm: the sources (streamed from host memory under auto), no eval
    model, and the engine: its weights split over the ranks, its KV cache as the engine sizes
    it (kv_cache_bytes: fitness.batch_size sequences of the tasks' longest request in 32-token
    blocks, at most the model's context), its activations, graphs; the table's rows say so."""
    from rich.console import Console

    from evomerge.fitness.vllm_backend import kv_cache_bytes
    from evomerge.search.memory import VLLM_GRAPHS

    bf16 = 7_241_732_096 * 2  # Mistral 7B's parameters in bf16
    data = _config(
        tiny_zoo, fams["7b-bf16"], sources="auto", gpu_memory="80GB", host_memory="2000GB"
    )
    plan = plan_memory(_vllm(data, batch_size=4), SequenceLength(300, "test"))
    assert plan.sources == "host" and "vLLM engine" in plan.auto_note
    parts = {r.part for r in plan.rows}
    assert not parts & {"candidate", "KV cache", "logits"}  # no HF eval model
    assert plan.bytes_of("cuda:0", "vLLM weights") == bf16
    per_token = 32 * 2 * 8 * 128 * 2  # layers x K,V x KV heads x head dim x bf16
    kv = kv_cache_bytes(per_token, 320, 4)  # 300 tokens asked: 10 blocks of 32
    assert plan.bytes_of("cuda:0", "vLLM KV cache") == kv > 4 * 320 * per_token
    longest = plan_memory(_vllm(data, batch_size=4), SequenceLength(10**6, "test"))
    assert longest.bytes_of("cuda:0", "vLLM KV cache") == kv_cache_bytes(per_token, 32768, 4)
    assert plan.bytes_of("cuda:0", "vLLM CUDA graphs") == VLLM_GRAPHS
    assert plan.bytes_of("host", "sources") == 3 * bf16 and plan.bytes_of("cuda:0", "sources") == 0
    # prompt logprobs of a step's tokens: at most its batch of 300-token sequences
    assert plan.bytes_of("cuda:0", "vLLM activations") > 4 * 320 * 32000 * 8
    assert plan.problem() is None
    Console(width=200).print(plan.table())
    out = capsys.readouterr().out
    assert "one vLLM engine" in out and "vLLM KV cache" in out and "max_model_len 320" in out

    # two ranks: each holds half the matrices; the merge and its write batches on the host
    two = plan_memory(
        _vllm(
            _config(
                tiny_zoo,
                fams["7b-bf16"],
                gpus_per_worker=2,
                gpu_memory="80GB",
                host_memory="2000GB",
            )
        ),
        SequenceLength(300, "test"),
    )
    halves = [two.bytes_of(f"cuda:{i}", "vLLM weights") for i in range(2)]
    assert halves[0] == halves[1] and bf16 / 2 < halves[0] < bf16 / 2 + 10**6  # norms: whole
    assert (
        two.bytes_of("host", "merge temporaries") > 0
        and two.bytes_of("host", "vLLM write batches") > 0
    )
    assert two.bytes_of("cuda:0", "merge temporaries") == 0
    # a CPU worker: everything in its own memory, no GPU parts
    cpu = plan_memory(
        _vllm(_config(tiny_zoo, fams["7b-bf16"], device="cpu"), batch_size=1),
        SequenceLength(300, "test"),
    )
    assert cpu.gpu_totals() == {} and cpu.bytes_of("cpu", "vLLM weights") == bf16
    assert cpu.bytes_of("cpu", "vLLM CUDA graphs") == 0


def test_a_vllm_worker_that_cannot_fit_is_refused_in_one_line(fams, tiny_zoo, tmp_path):
    """The engine's KV cache is sized to the tasks' requests: at fitness.batch_size 64 the
    zoo's short tasks fit Mistral 7B on an 80 GB GPU (`--check` passes), where 64 sequences of
    its 32k context (344 GB) would not: that plan is refused in one line naming the KV cache and
    the batch that fits; with the sources on the GPU as well, the line names the sources."""
    data = _config(
        tiny_zoo, fams["7b-bf16"], sources="auto", gpu_memory="80GB", host_memory="2000GB"
    )
    data["fitness"] |= {"backend": "vllm", "batch_size": 64}
    result = _check(tmp_path, data)
    assert result.exit_code == 0, result.output
    whole = SequenceLength(32768, "test")
    line = plan_memory(_vllm(data, batch_size=64), whole).problem()
    assert line is not None
    assert "the largest part is the vLLM KV cache: set fitness.batch_size: " in line, line
    batch = int(line.rsplit("fitness.batch_size: ", 1)[1])
    assert plan_memory(_vllm(data, batch_size=batch), whole).fits_gpus()
    assert not plan_memory(_vllm(data, batch_size=2 * batch), whole).fits_gpus()

    data = _config(
        tiny_zoo, fams["7b-bf16"], sources="device", gpu_memory="64GB", host_memory="2000GB"
    )
    plan = plan_memory(_vllm(data, batch_size=4), SequenceLength(300, "test"))
    line = plan.problem()
    assert line is not None and "the largest part is the sources: set workers.sources: host" in line
