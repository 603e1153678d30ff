#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# aiohttp/torchsde: the ComfyUI server tests' requirements (test extra), missing from older .venv folders
if ! .venv/bin/python -c "import comfyquant, pytest, aiohttp, torchsde" 2>/dev/null; then
  bash scripts/setup.sh
fi
.venv/bin/ruff check comfyquant tests benchmarks
exec .venv/bin/python -m pytest -q "$@"
