#!/usr/bin/env bash
# Set up a virtual environment in .venv with comfyquant and everything its tests and examples need.
# Usage: bash scripts/setup.sh [--torch SPEC]   (default SPEC: torch==2.13.0, the CPU build this project pins;
#        pass e.g. --torch "torch" to take your platform's build, or --torch skip if .venv already has one)
set -euo pipefail
cd "$(dirname "$0")/.."
torch_spec="torch==2.13.0"
while [ $# -gt 0 ]; do
  case "$1" in
    --torch) torch_spec="$2"; shift 2 ;;
    *) echo "setup.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
pip_() { .venv/bin/python -m pip install --disable-pip-version-check -q "$@"; }
if [ "$torch_spec" != "skip" ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $torch_spec" >&2
  pip_ "$torch_spec"
fi
echo "setup: installing comfyquant (editable) with dev, eval and test extras" >&2
pip_ -e ".[dev,eval,test]"
echo "setup: done (.venv/bin/comfyquant)" >&2
