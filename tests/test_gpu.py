"""GPU paths (`pytest -m gpu` on a machine with CUDA; excluded from `make test`;
experiments/gpu_check.sh runs them with the GPU benchmarks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge.engine import merge_to_dir
from evomerge.merge.placement import Placement
from evomerge.merge.recipe import Recipe
from evomerge.merge.synthetic import make_family
from tests.conftest import recipe_dict

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _cuda():
    assert torch.cuda.is_available(), "the gpu marker needs a CUDA device"


LAYERS = 8
WINDOW = 8 << 20  # the read-ahead window in the host test: a small fraction of the sources


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    """bf16, sharded, ~26M parameters (150 MB of sources), no tensor over 1M entries: one
    tensor's inputs and temporaries plus the window are a fraction of the sources."""
    return make_family(
        tmp_path_factory.mktemp("bf16"),
        "llama",
        experts=2,
        dtype=torch.bfloat16,
        shards=2,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
    )


def _recipe(paths, method):
    """`method`, or `method:counter` for a random method's counter masks."""
    method, _, masks = method.partition(":")
    data = recipe_dict(paths, method, layers=LAYERS)
    data["dtype"] = "bfloat16"
    if masks:
        data["parameter_space"]["masks"] = masks
    return Recipe.parse(data)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "slerp"])
def test_cuda_merge_matches_cpu(tmp_path, llama_family, method):
    data = recipe_dict(llama_family, method)
    if method == "slerp":
        data["parameter_space"]["groups"][0]["params"] = {"expert1": {}}
    recipe = Recipe.parse(data)
    merge_to_dir(recipe, tmp_path / "cpu", device="cpu")
    merge_to_dir(recipe, tmp_path / "gpu", device="cuda")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "gpu"))
    for name in a:  # random masks come from a CPU generator: the same on both devices
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def _candidate(paths, where, device):
    from evomerge.fitness.models import empty_model
    from evomerge.merge.resident import ResidentSources

    placement = Placement((device,), LAYERS)
    sources = ResidentSources(paths, "base", placement, where)
    return sources, empty_model(paths["base"], "bfloat16", placement)


@pytest.mark.parametrize(
    "method", ["ties", "dare_ties", "dare_ties:counter", "task_arithmetic", "linear"]
)
def test_bf16_resident_candidate_on_cuda_matches_cpu(bf16_family, method, monkeypatch):
    """bf16 sources resident on the GPU, a bf16 candidate: elementwise methods (merged a chunk
    at a time there) give the CPU's bits exactly, DARE's masks drawn on the CPU (torch's
    generator) or on the GPU (counter draws); TIES, compiled into one fused kernel, within a
    bf16 unit."""
    from evomerge.merge.ops import fused

    monkeypatch.setattr(fused, "GPU_CHUNK", 100_000)  # several chunks per tensor
    recipe = _recipe(bf16_family, method)
    sources, model = _candidate(bf16_family, "device", "cuda:0")
    assert all(
        t.is_cuda and t.dtype == torch.bfloat16 for t in sources.models["base"].tensors.values()
    )
    sources.materialize(recipe, model)
    cpu_sources, cpu_model = _candidate(bf16_family, "device", "cpu")
    cpu_sources.materialize(recipe, cpu_model)
    for (n, p), (_, q) in zip(model.named_parameters(), cpu_model.named_parameters(), strict=True):
        assert p.is_cuda
        if method == "ties":
            assert torch.allclose(p.float().cpu(), q.float(), rtol=2**-7, atol=1e-6), n
        else:
            assert torch.equal(_bits(p), _bits(q)), n


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_host_sources_stream_to_cuda_with_the_same_bits_and_less_memory(
    bf16_family, method, monkeypatch
):
    """workers.sources host: the sources sit in pinned host memory and the GPU holds the
    candidate plus a bounded window of inputs; the candidate is bit for bit the one built from
    GPU-resident sources (the same GPU arithmetic, only the inputs' home differs)."""
    from evomerge.merge import engine

    monkeypatch.setattr(engine, "READ_AHEAD", WINDOW)
    recipe = _recipe(bf16_family, method)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    host, host_model = _candidate(bf16_family, "host", "cuda:0")
    assert all(t.is_pinned() for t in host.models["expert1"].tensors.values())
    candidate_bytes = sum(p.numel() * p.element_size() for p in host_model.parameters())
    resident = torch.cuda.memory_allocated() - before
    assert resident <= 1.05 * candidate_bytes + 2**20  # the candidate alone (and buffers)
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    host.materialize(recipe, host_model)
    torch.cuda.synchronize()
    streamed = torch.cuda.max_memory_allocated() - start
    largest = max(t.numel() for t in host.models["base"].tensors.values())
    # the read-ahead window, plus one tensor's inputs and (eager) fp32 temporaries beyond it
    assert streamed <= WINDOW + largest * (3 * 2 + 12 * 4)
    assert streamed < host.nbytes() / 2  # far from holding the sources
    device, device_model = _candidate(bf16_family, "device", "cuda:0")
    device.materialize(recipe, device_model)
    pairs = zip(host_model.named_parameters(), device_model.named_parameters(), strict=True)
    for (n, p), (_, q) in pairs:
        assert torch.equal(_bits(p), _bits(q)), n


def test_sources_load_through_pinned_staging_with_the_files_bits(
    bf16_family, tmp_path, monkeypatch
):
    """Start-up on a GPU (merge.resident.Loader): device sources read on several threads into
    pinned staging buffers and copied on side streams hold the CPU load's bits; host sources
    are read straight into pinned memory; a NaN found by the check queued on the GPU is named
    as on the CPU (the first damaged tensor in network order)."""
    from evomerge.merge import resident
    from evomerge.merge.errors import EvomergeError
    from evomerge.merge.resident import ResidentSources
    from tests.test_loading import _damage

    monkeypatch.setattr(resident, "PIECE", 64 << 10)  # many pieces: each buffer reused often
    placement = Placement(("cuda:0",), LAYERS)
    cpu = ResidentSources(bf16_family, "base", "cpu", load_threads=1)
    gpu = ResidentSources(bf16_family, "base", placement, "device", load_threads=3)
    host = ResidentSources(bf16_family, "base", placement, "host", load_threads=3)
    assert gpu.load_stats.staged and not host.load_stats.staged
    assert gpu.load_stats.bytes == gpu.nbytes() == cpu.nbytes()
    for alias in bf16_family:
        want = cpu.models[alias].tensors
        for name, t in want.items():
            g, h = gpu.models[alias].tensors[name], host.models[alias].tensors[name]
            assert g.device == torch.device("cuda:0") and h.is_pinned(), name
            assert torch.equal(_bits(g), _bits(t)) and torch.equal(_bits(h), _bits(t)), name
    expert2 = cpu.models["expert2"].tensors
    names = [n for n in cpu.models["expert2"].names if expert2[n].numel() * 2 > 3 * (64 << 10)]
    early, late = names[0], names[-1]  # the NaN in the last piece of the first
    values = {early: (expert2[early].numel() - 1, float("nan")), late: (0, float("-inf"))}
    bad = _damage(bf16_family["expert2"], tmp_path / "bad", values)
    with pytest.raises(EvomergeError, match=rf"models\.expert2: tensor {early!r} in .* NaN or inf"):
        ResidentSources({**bf16_family, "expert2": bad}, "base", placement, load_threads=3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_candidate_split_over_two_gpus_matches_one(bf16_family):
    """workers.gpus_per_worker 2: the layers split over two GPUs (accelerate's hooks carry the
    hidden state), each GPU merging its own tensors from its own sources: the same weights and
    the same logits as on one GPU."""
    from evomerge.fitness.models import empty_model
    from evomerge.merge.resident import ResidentSources

    recipe = _recipe(bf16_family, "ties")
    two = Placement(("cuda:0", "cuda:1"), LAYERS)
    sources = ResidentSources(bf16_family, "base", two, "device")
    model = empty_model(bf16_family["base"], "bfloat16", two)
    devices = {str(p.device) for p in model.parameters()}
    assert devices == {"cuda:0", "cuda:1"}
    assert {str(t.device) for t in sources.models["base"].tensors.values()} == devices
    sources.materialize(recipe, model)
    one_sources, one = _candidate(bf16_family, "device", "cuda:0")
    one_sources.materialize(recipe, one)
    for (n, p), (_, q) in zip(model.named_parameters(), one.named_parameters(), strict=True):
        assert torch.equal(_bits(p), _bits(q)), n
    ids = torch.arange(16, device="cuda:0").reshape(2, 8)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits.float().cpu(), one(ids).logits.float().cpu())


def test_worker_scores_on_cuda_as_on_cpu(tiny_zoo):
    """A whole worker on the GPU (the eval model built there, lm-eval's requests answered
    there, TF32 on) scores a candidate as the CPU worker does."""
    from evomerge.search.loop.workers import TrialWorker
    from evomerge.search.spaces import space_for
    from evomerge.search.trial import Trial
    from tests.conftest import search_config

    config = search_config(tiny_zoo)
    space = space_for(config)
    x = space.x0() + np.random.default_rng(0).normal(0, 0.3, space.dim)
    trial = Trial(0, 0, space.decode(x, seed=1).model_dump(mode="json", exclude_none=True))
    results = {}
    for device in ("cpu", "cuda"):
        worker = TrialWorker(config.dump(), device)
        assert all(p.device.type == device for p in worker.candidate.model.parameters())
        results[device] = worker.run(trial)
        assert results[device].status.name == "COMPLETE", results[device].error
    assert torch.backends.cuda.matmul.allow_tf32
    for key, value in results["cpu"].metrics.items():
        assert abs(results["cuda"].metrics[key] - value) <= 0.15, key


def test_memory_plan_matches_what_a_cuda_worker_allocates(bf16_family, tmp_path):
    """The plan's sources and candidate rows (search/memory.py) against torch's allocator."""
    from evomerge.search.memory import plan_memory
    from tests.conftest import search_config

    config = search_config(
        tmp_path,
        models={a: {"path": str(p)} for a, p in bf16_family.items()},
        workers={"count": 0, "sources": "device", "device": "cuda"},
    )
    plan = plan_memory(config)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    sources, model = _candidate(bf16_family, "device", "cuda:0")
    allocated = torch.cuda.memory_allocated() - before
    planned = plan.bytes_of("cuda:0", "sources") + plan.bytes_of("cuda:0", "candidate")
    assert abs(allocated - planned) <= 0.05 * planned, (allocated, planned)


def test_counter_masks_on_cuda_are_the_cpus():
    """DARE's counter draws made on the GPU (integer torch ops) are the CPU's NumPy draws, bit
    for bit, so a dare_ties candidate merged on a GPU is the one rebuilt on a CPU."""
    from evomerge.merge.ops.masks import CounterDraws, uniform_np, uniform_torch

    for key, lo, n in [(0, 0, 1 << 20), (0xDEADBEEF, (1 << 32) - (1 << 20), 1 << 20)]:
        gpu = uniform_torch(key, lo, lo + n, "cuda").cpu().numpy()
        assert np.array_equal(gpu.view(np.uint32), uniform_np(key, lo, lo + n).view(np.uint32))
    a = CounterDraws(3).uniform((512, 300), "cuda").cpu()
    b = CounterDraws(3).uniform((512, 300), "cpu")
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))
