"""The ComfyUI fetch for tests: verified, idempotent, safe when two processes fetch into the same fresh cache."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from comfyquant.testing.comfyui_env import (
    COMFY_KITCHEN_VERSION,
    COMFYUI_VERSION,
    STANDIN_PACKAGES,
    StandInFinder,
    comfyui_dir,
    ensure_comfyui,
    import_comfy,
    kitchen_dir,
    read_comfyui_version,
)

pytestmark = pytest.mark.comfyui


def test_cache_is_verified_and_idempotent(comfyui_root: Path, comfy: Any) -> None:
    marker = comfyui_root / "COMPLETE.json"
    info = json.loads(marker.read_text())
    assert info["comfyui"] == COMFYUI_VERSION and info["comfy_kitchen"] == COMFY_KITCHEN_VERSION
    assert read_comfyui_version(comfyui_dir(comfyui_root)) == COMFYUI_VERSION == comfy.version
    before = marker.stat().st_mtime_ns
    assert ensure_comfyui(comfyui_root) == comfyui_root
    assert marker.stat().st_mtime_ns == before  # a complete cache is not rebuilt
    assert import_comfy(comfyui_root).ops is comfy.ops  # importing again is a no-op
    assert Path(comfy.ops.__file__).is_relative_to(comfyui_dir(comfyui_root))
    assert Path(comfy.kitchen.__file__).is_relative_to(kitchen_dir(comfyui_root))
    assert not (Path(__file__).resolve().parents[1] / "comfy").exists(), "ComfyUI must never land in the repo"


@pytest.mark.slow
def test_concurrent_fetch_into_a_fresh_cache_replaces_a_partial_one(tmp_path: Path) -> None:
    cache = tmp_path / "comfyui"
    (cache / "ComfyUI").mkdir(parents=True)  # a partial tree without the completion marker
    (cache / "ComfyUI" / "half-written.py").write_text("x = 1\n")
    code = ("import sys; from comfyquant.testing.comfyui_env import ensure_comfyui; "
            "print(ensure_comfyui(sys.argv[1]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert Path(out.strip()) == cache.resolve()
    assert read_comfyui_version(comfyui_dir(cache)) == COMFYUI_VERSION
    assert not (cache / "ComfyUI" / "half-written.py").exists()
    assert (kitchen_dir(cache) / "comfy_kitchen" / "__init__.py").is_file()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "comfyui" and not p.name.endswith(".lock"))
    assert leftovers == []
    assert not (cache / "downloads").exists()


def test_stand_ins_import_but_raise_when_used(comfy: Any) -> None:
    finder = StandInFinder(["cq_fake_vision"])
    assert finder.find_spec("torch") is None
    spec = finder.find_spec("cq_fake_vision.transforms")
    assert spec is not None and spec.loader is finder
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    resize = mod.functional.resize  # attribute chains resolve at import time ...
    with pytest.raises(RuntimeError, match=r"cq_fake_vision\.transforms\.functional\.resize is a test stand-in"):
        resize(1, 2)  # ... and raise when called
    # only packages that are really missing were stood in for while importing ComfyUI
    assert set(comfy.standins) <= set(STANDIN_PACKAGES)
    for name in comfy.standins:
        assert name not in sys.modules or type(sys.modules[name]).__name__ == "_StandInModule"


def test_standins_do_not_outlive_comfyui_import(comfy):
    # The stand-ins exist only while ComfyUI imports: afterwards a missing package must look missing to other
    # libraries in the same process (transformers probes torchvision's version and fails on a fake one).
    import importlib.util
    import sys

    assert not any(isinstance(f, StandInFinder) for f in sys.meta_path)
    for name in comfy.standins:
        assert name not in sys.modules
        assert importlib.util.find_spec(name) is None
