#!/usr/bin/env bash
# The Python packages evomerge needs that a bare CUDA image lacks (such images ship PyTorch,
# transformers, accelerate, safetensors, pandas, rich, typer, pytest and hypothesis, but not
# these), as wheels for CPython 3.12 in .whl/, for a GPU machine that reaches no registry:
# experiments/gpu_check.sh installs whatever .whl/ holds before it runs. Run it here, where
# pip reaches a registry; versions are those of this checkout's .venv (`make setup`).
# Ray is left out: its wheel alone is larger than a device call may carry, and no GPU check
# needs it (the GPU worker is checked in-process).
set -euo pipefail
cd "$(dirname "$0")/.."
NEED="pydantic pydantic-core annotated-types typing-inspection cma lm-eval datasets dill
evaluate multiprocess more-itertools pytablewriter dataproperty mbstrdecoder pathvalidate
tabledata tcolorpy typepy chardet rouge-score nltk absl-py sqlitedict word2number"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for name in $NEED; do
  version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}' || true)
  spec=$name${version:+==$version}
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$spec" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$spec"  # sdist only: pure Python, built here
done
du -sh .whl
