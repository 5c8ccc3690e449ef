#!/usr/bin/env bash
# Creates (or updates) .venv-vision: the environment for the tests marked `vision` (pytest -m vision).
#
# segment-anything and groundingdino-py import torchvision, and PyPI's torchvision does not import beside the
# main environment's CPU build of torch 2.13.0. This environment takes the matching pair instead, which pip
# finds on this machine's disk on x86_64 (a CUDA build, about 5.5 GB; it runs on the CPU too), then the
# package with its [sam,groundingdino,dev] extras. Every step is skipped when already satisfied.
# Exits 3, before installing anything large, when the disk has too little room for the pair (VISION_ENV_NEEDED_MB).
#
# Override the pair with TORCH_VERSION / TORCHVISION_VERSION; PYTHON picks the interpreter (3.11 here).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-vision}"
PYTHON="${PYTHON:-python3}"
if [ "$(uname -m)" = "aarch64" ]; then
    # The pair that imports on aarch64 (a CPU build).
    TORCH_VERSION="${TORCH_VERSION:-2.9.1}"
    TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.24.1}"
else
    TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
    TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.29.1}"
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "make_vision_env: creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
fi

# torch and torchvision first and pinned: a bare `torch` requirement from a later step would otherwise be free
# to pick another build.
if ! "$VENV/bin/python" - "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'PY' 2>/dev/null; then
import sys
from importlib.metadata import version

sys.exit(0 if (version("torch"), version("torchvision")) == (sys.argv[1], sys.argv[2]) else 1)
PY
    # The pair fills several GB; a disk that cannot hold it would otherwise fail half-way through pip with
    # "No space left on device". Exit 3 says "not enough disk" to the caller (the Makefile's test-vision).
    NEEDED_MB="${VISION_ENV_NEEDED_MB:-7000}"
    FREE_MB="$(df -Pm "$(dirname "$VENV")" | awk 'NR == 2 {print $4}')"
    if [ "$FREE_MB" -lt "$NEEDED_MB" ]; then
        echo "make_vision_env: torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION need about $NEEDED_MB MB" \
            "free beside $VENV; $FREE_MB MB are free" >&2
        exit 3
    fi
    echo "make_vision_env: installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
    "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# The package, editable, with the research backends; redone only when its requirements change.
STAMP="$VENV/.realign-pipeline-installed"
WANTED="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) torch==$TORCH_VERSION"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANTED" ]; then
    echo "make_vision_env: installing realign-pipeline[sam,groundingdino,dev]"
    "$VENV/bin/pip" install --quiet -e "$ROOT[sam,groundingdino,dev]" "torch==$TORCH_VERSION" \
        "torchvision==$TORCHVISION_VERSION"
    echo "$WANTED" > "$STAMP"
fi

# Fails here, not in the middle of a test run, if the pair does not import together.
"$VENV/bin/python" -c "import torch, torchvision, segment_anything, groundingdino, realign_pipeline.grounding"
echo "make_vision_env: $VENV ready (torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION)"
