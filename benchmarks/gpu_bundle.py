"""Build ``.whl/``: what ``gpu_suite.py`` unpacks on the device machine, which cannot download anything.

    .venv/bin/python benchmarks/gpu_bundle.py    # then: run(..., carry=[".whl"])

- ``ck.zip``: comfy-kitchen 0.2.40's CUDA wheel (cp312, manylinux) as a package tree for PYTHONPATH, without
  its ROCm library (157 MB, which would not fit the 64 MiB a device call carries);
- ``comfyui.zip``: the verified ComfyUI 0.30.0 + pure comfy-kitchen cache the tests use (fetched if absent);
- ``wheels/``: pure wheels the device's Python lacks: ComfyUI's small module-level imports, and the peer
  (convert_to_quant 1.3.4 with its optimizer package) for the optimizer comparison.

Every fresh checkout lacks ``.whl/`` (it is ignored); the bundle is rebuilt in about a minute. ``--slim``: both
archives LZMA-compressed (ck.zip 36 -> 34 MB, comfyui.zip 13 -> 4 MB) and ComfyUI's tokenizer files left out (the
diffusion-model benches tokenize nothing), so ComfyUI and comfy-kitchen's CUDA kernels fit one call together: the
stock rows then run on the kernels users have (RoPE, int8), not comfy-kitchen's eager fallbacks.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    from comfyquant.testing.comfyui_env import COMFY_KITCHEN_VERSION, ensure_comfyui
except ImportError as e:  # run outside the project's venv (torch missing)
    print(f"gpu_bundle: error: {e}; run it with the project's venv: .venv/bin/python benchmarks/gpu_bundle.py",
          file=sys.stderr)
    sys.exit(2)

DEVICE_PY = "3.12"  # the device machine's Python (torch 2.11, triton 3.6)
DEVICE_PLATFORM = "manylinux_2_28_x86_64"
WHEELS = ("packaging", "einops", "comfy-aimdo==0.4.11", "torchsde", "trampoline", "convert_to_quant==1.3.4",
          "prodigy-plus-schedule-free==2.0.1")
CARRY_BYTES = 64 << 20  # a device call carries 64 MiB: the working tree and this bundle together


def tree_bytes() -> int:
    """Bytes of the tracked files (what a device call carries besides the bundle; 17 MB in December 2026)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return sum((ROOT / n).stat().st_size for n in names.decode().split("\0") if n and (ROOT / n).is_file())


def _pip_download(reqs: list[str], dest: Path, *extra: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), "--only-binary=:all:",
           "--python-version", DEVICE_PY, *extra, *reqs]
    if subprocess.run(cmd).returncode != 0:
        print(f"gpu_bundle: error: pip could not download {' '.join(reqs)} (network, or no wheel for "
              f"Python {DEVICE_PY})", file=sys.stderr)
        sys.exit(2)


def kitchen_zip(out: Path, work: Path, slim: bool = False) -> None:
    """The CUDA wheel's files minus the ROCm backend's shared library, zipped as a PYTHONPATH tree (``slim``: LZMA)."""
    _pip_download([f"comfy-kitchen=={COMFY_KITCHEN_VERSION}"], work, "--platform", DEVICE_PLATFORM)
    wheel = next(work.glob("comfy_kitchen-*-cp312-*.whl"))
    method = zipfile.ZIP_LZMA if slim else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", method) as dst:
        for info in src.infolist():
            if info.filename.startswith("comfy_kitchen/backends/hip/") and info.filename.endswith(".so"):
                continue
            dst.writestr(info.filename, src.read(info))


def _tokenizer_file(p: Path) -> bool:
    """A text encoder's tokenizer data (vocabularies, merges), not code: ``cosmos_tokenizer`` is a package."""
    return p.suffix != ".py" and any(part.endswith("tokenizer") for part in p.parts[:-1])


def comfyui_zip(out: Path, slim: bool = False) -> None:
    """The test cache (``comfyui-0.30.0/...``) zipped with its folder name, as gpu_suite unpacks it (``slim``: LZMA,
    without the text encoders' tokenizer files)."""
    root = ensure_comfyui()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_LZMA if slim else zipfile.ZIP_DEFLATED) as z:
        for p in sorted(root.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and not (slim and _tokenizer_file(p.relative_to(root))):
                z.write(p, Path(root.name) / p.relative_to(root))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / ".whl")
    p.add_argument("--no-comfyui", action="store_true",
                   help="leave out ComfyUI's copy (12 MiB) for calls without a comfyui step")
    p.add_argument("--slim", action="store_true",
                   help="LZMA archives, no tokenizers: ComfyUI with comfy-kitchen's CUDA kernels in one call")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        kitchen_zip(a.out / "ck.zip", Path(tmp), a.slim)
    if a.no_comfyui:
        (a.out / "comfyui.zip").unlink(missing_ok=True)
    else:
        comfyui_zip(a.out / "comfyui.zip", a.slim)
    wheels = a.out / "wheels"
    wheels.mkdir(exist_ok=True)
    _pip_download(list(WHEELS), wheels, "--platform", "any")
    total = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file())
    for f in sorted(a.out.rglob("*")):
        if f.is_file():
            print(f"{f.stat().st_size / 2**20:8.1f} MiB  {f.relative_to(a.out)}")
    tree = tree_bytes()
    print(f"{total / 2**20:8.1f} MiB  total, with the working tree's {tree / 2**20:.1f} MiB "
          f"{(total + tree) / 2**20:.1f} of the {CARRY_BYTES / 2**20:.0f} MiB a call carries")
    if total + tree > CARRY_BYTES:
        print("gpu_bundle: error: the bundle and the working tree are too large to carry together "
              "(--no-comfyui leaves ComfyUI out for calls that do not need it)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
