#!/usr/bin/env bash
# Run the test suite (sets up .venv first if needed), then the short pass on an emulated CPU without VNNI
# (scripts/test_isa_caps.sh). Extra arguments go to pytest, and then only the main pass runs.
set -euo pipefail
cd "$(dirname "$0")/.."
# aiohttp/torchsde: the ComfyUI server tests' requirements, triton (Linux x86_64): the interpreter tests' (all in
# the test extra), missing from older .venv folders
if ! .venv/bin/python -c "import platform, sys, comfyquant, pytest, aiohttp, torchsde
sys.platform == 'linux' and platform.machine() == 'x86_64' and __import__('triton')" 2>/dev/null; then
  bash scripts/setup.sh
fi
.venv/bin/ruff check comfyquant tests benchmarks
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
status=0
.venv/bin/python -m pytest -q || status=$?
bash scripts/test_isa_caps.sh || status=$?
exit "$status"
