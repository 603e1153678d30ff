"""Capture Calibration: record calibration statistics while ComfyUI samples, for the converter's optimizers.

The node returns a clone of the MODEL carrying ``OUTER_SAMPLE`` / ``APPLY_MODEL`` wrappers. Every sampling run of
that clone (KSampler, SamplerCustom ...) runs inside ``comfyquant.calibration.Collector``: forward pre-hooks on the
diffusion model's float linear layers accumulate their input statistics (Hessian, absmax, percentiles, a row
sample), named as the checkpoint names them, and when the run ends they are written to
``output/<prefix>_NNNNN_.safetensors``, the file ``comfyquant convert --calibration`` reads. Hooks exist only
during the run; the model's outputs are unchanged.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from comfyquant.calibration import CalibrationConfig, Collector, save_stats, strip_prefix

logger = logging.getLogger("comfyquant.nodes")

WRAPPER_KEY = "comfyquant_capture_calibration"
MSG_NO_FLOAT = ("Capture Calibration: the sampling run used no float linear layer of the diffusion model, so no "
                "calibration file was written (capture on the float MODEL, before Enable INT8 on MODEL).")


@dataclass(frozen=True)
class CaptureSettings:
    """Where files go (``output_dir`` / ``filename_prefix``) and the collector's configuration."""

    output_dir: str
    filename_prefix: str
    config: CalibrationConfig


def _next_path(settings: CaptureSettings) -> str:
    import folder_paths

    folder, name, counter, _, _ = folder_paths.get_save_image_path(settings.filename_prefix, settings.output_dir)
    return os.path.join(folder, f"{name}_{counter:05}_.safetensors")


class CaptureWrapper:
    """Two wrappers sharing one run: ``outer`` (``OUTER_SAMPLE``) owns the collector and writes the file after the
    run; ``step`` (``APPLY_MODEL``) registers the hooks at the first model call, once ComfyUI has loaded the
    model (before that, another MODEL's object patches may still be swapped into the shared modules)."""

    def __init__(self, settings: CaptureSettings) -> None:
        self.settings = settings
        self.written: list[str] = []
        self._armed = False  # inside a sampling run of this MODEL
        self._collector: Collector | None = None

    def step(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        if self._armed and self._collector is None:
            self._collector = Collector(executor.class_obj, strip_prefix("diffusion_model."),
                                        config=self.settings.config).__enter__()
        return executor(*args, **kwargs)

    def outer(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        patcher = executor.class_obj.model_patcher
        self._armed, self._collector = True, None
        try:
            out = executor(*args, **kwargs)
        finally:
            collector, self._armed, self._collector = self._collector, False, None
            if collector is not None:
                collector.__exit__(None, None, None)
        if collector is None or not collector.layers:
            logger.warning(MSG_NO_FLOAT)
            return out
        stats = collector.stats({"source": "ComfyUI sampling", "model": type(patcher.model).__name__})
        path = _next_path(self.settings)
        save_stats(stats, path)
        self.written.append(path)
        rows = min(s.count for s in stats.layers.values())
        logger.info("comfyquant: calibration of %d layers (>= %d input rows each) written to %s",
                    len(stats.layers), rows, path)
        return out


def capture_calibration(patcher: Any, settings: CaptureSettings) -> tuple[Any, CaptureWrapper]:
    """A clone of ``patcher`` whose sampling runs record calibration statistics (see the module docstring)."""
    from comfy.patcher_extension import WrappersMP

    clone = patcher.clone()
    wrapper = CaptureWrapper(settings)
    for kind, fn in ((WrappersMP.OUTER_SAMPLE, wrapper.outer), (WrappersMP.APPLY_MODEL, wrapper.step)):
        clone.remove_wrappers_with_key(kind, WRAPPER_KEY)  # one capture per MODEL
        clone.add_wrapper_with_key(kind, WRAPPER_KEY, fn)
    return clone, wrapper
