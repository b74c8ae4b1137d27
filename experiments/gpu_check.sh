#!/usr/bin/env bash
# Every GPU path of evomerge in one run, for the first machine with a GPU (minutes on one GPU):
# the `gpu` tests (resident bf16 sources on CUDA, host sources streamed over a copy stream, a
# worker split over two GPUs where there are two, a whole worker scoring on CUDA, the memory
# plan against the allocator), then the GPU benchmarks (worker memory, device vs host; merge
# seconds per candidate). Usage: bash experiments/gpu_check.sh  (figures under $OUT, else
# experiments/results/gpu).
#
# Python: the checkout's .venv when it has a CUDA torch (`make setup` on a GPU machine), else
# the machine's python3 with the project importable from a tree of links (no install, no
# network) and whatever wheels .whl/ holds (experiments/gpu_wheels.sh fetches them).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-experiments/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch,sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  PY=.venv/bin/python
else
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/evomerge-site .whl/*.whl
    export PYTHONPATH=/tmp/evomerge-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  links=build/gpu/evomerge
  mkdir -p "$links"
  for d in merge search fitness configs; do ln -sfn "../../../$d" "$links/$d"; done
  export PYTHONPATH=$PWD/build/gpu:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PY'
import importlib, sys
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")
need = ["transformers", "accelerate", "safetensors", "pydantic", "lm_eval", "cma", "pytest", "yaml"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)}; run experiments/gpu_wheels.sh "
             "where pip reaches a registry and carry .whl/")
import evomerge.merge.resident as r
print("evomerge from", r.__file__)
PY

status=0
step() {  # name, command...: run one step, keep going, remember a failure
  local name=$1; shift
  echo "== $name"
  local t0=$SECONDS
  if "$@" 2>&1 | tee "$out/$name.log"; then echo "== $name: ok ($((SECONDS - t0)) s)";
  else echo "== $name: FAILED ($((SECONDS - t0)) s)"; status=1; fi
}
step gpu-tests timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py
# bench_scale measures the code of older commits beside this one: it needs the git history
if git rev-parse -q --verify 'd46ec38^{commit}' >/dev/null 2>&1; then
  step bench-scale timeout 180 "$PY" experiments/bench_scale.py --quick --out "$out/bench_scale.json"
else
  echo "== bench-scale: not run (no git history here: its before figures need commit d46ec38)"
fi
step bench-gpu timeout 180 "$PY" experiments/bench_gpu.py --out "$out/bench_gpu.json"
exit $status
