"""Pytest plumbing for the ComfyUI compatibility tests: the ``--comfyui-cache`` option and the ``comfy`` fixture.

Loaded from ``conftest.py`` with ``pytest_plugins``; the fixture fetches ComfyUI 0.30.0 and comfy-kitchen 0.2.40
once per machine (see ``comfyquant.testing.comfyui_env``) and imports ComfyUI's own loader modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from comfyquant.eval.workloads import DIT_FIXTURE
from comfyquant.testing.comfyui_env import ComfyModules, default_cache_dir, ensure_comfyui, import_comfy


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--comfyui-cache", default=None, metavar="DIR",
                     help=f"where ComfyUI 0.30.0 + comfy-kitchen 0.2.40 are cached (default {default_cache_dir()})")


@pytest.fixture(scope="session")
def comfyui_root(pytestconfig: pytest.Config) -> Path:
    """The verified cache folder (downloaded on first use)."""
    option = pytestconfig.getoption("--comfyui-cache")
    return ensure_comfyui(Path(option) if option else None)


@pytest.fixture(scope="session")
def comfy(comfyui_root: Path) -> ComfyModules:
    """ComfyUI's ``comfy.ops``, ``comfy.utils``, ``comfy.sd`` ... imported from the cache."""
    return import_comfy(comfyui_root)


@pytest.fixture(scope="module")
def torch_single_thread() -> Iterator[None]:
    """Run a module's many tiny matmuls on one intra-op thread, restoring the setting afterwards.

    On the shared 2-core CI machine OpenMP workers spin against other processes: these tests took 240 s with
    torch's default threads and 34 s with one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dit_sd() -> dict[str, torch.Tensor]:
    """The digits DiT's tensors (Flux layout, ComfyUI loads it: ``comfyquant.eval.workloads.DIT_FIXTURE``)."""
    from safetensors.torch import load_file

    return load_file(str(DIT_FIXTURE))


def model_patcher(comfy: Any, sd: dict[str, torch.Tensor]) -> Any:
    """ComfyUI's own ModelPatcher for a diffusion-model state dict (given a copy: ComfyUI's loader pops keys)."""
    return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={})


@contextmanager
def patched(patcher: Any, **load: Any) -> Iterator[Any]:
    """A ComfyUI ``ModelPatcher`` with its patches applied (``load``: ``patch_model``'s arguments, e.g. a lowvram
    budget) for the block's duration, unpatched after it however it ends; yields the patcher."""
    patcher.patch_model(**load)
    try:
        yield patcher
    finally:
        patcher.unpatch_model()

