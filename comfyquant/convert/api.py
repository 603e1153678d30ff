"""``comfyquant.convert``: the public Python entry point of the converter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from comfyquant.convert.pipeline import ConvertOptions, run_conversion
from comfyquant.convert.report import Report
from comfyquant.progress import Progress, as_progress


def convert(input: str | Path, output: str | Path, format: str = "int8", model: str = "auto",
            layer_config: str | Path | None = None, report: str | Path | None = None,
            plot: str | Path | None = None, device: str = "cpu", low_memory: bool = False,
            force: bool = False, block_size: int = 128, progress: bool | Progress = True,
            fallback: str | None = None, strict_preset: bool = False, optimizer: Any = None,
            calibration: Any = None, calibration_lora: str | Path | None = None, budget: Any = None,
            target_gpu: str | None = None, allow_comfyquant_formats: bool = False, probe: Any = None,
            verify_heldout: bool = True) -> Report:
    """Convert a float checkpoint (one .safetensors or a sharded index) into one quantized .safetensors file.

    Writes ``report`` (JSON) and ``plot`` (PNG of per-layer SQNR) when given; returns the :class:`Report`.
    ``fallback`` is where a layer goes when its shape cannot take ``format`` (a format name, or "none" to keep
    it in high precision; default: the format's own fallback, e.g. int8-rot -> int8).
    ``optimizer`` (an ``OptimizerConfig``, or a method name: rtn, gptq, learned, quip) with ``calibration``
    (a file from ``comfyquant calibrate``, or ``"synthetic"``) picks the rounding; ``calibration_lora``
    weights the Hessians toward a LoRA's input directions.
    ``format="auto"`` chooses every layer's format to meet ``budget`` (``"size=0.4"``, ``"psnr=45"``, ...; see
    docs/AUTO_PRECISION.md) among the registry's formats for ``target_gpu`` (``allow_comfyquant_formats``: also
    those stock ComfyUI cannot load); ``calibration`` gives the layer statistics, ``probe`` (an
    ``autoprec.Probe``, e.g. ``comfyquant.eval.autoprobe.probe_for(input)``) the end-to-end weights and the
    held-out check. The plan is in ``Report.auto`` and the file's ``__metadata__["comfyquant.auto"]``.
    ``progress``: True (a bar on a terminal, else lines on stderr), False (none) or a
    :class:`comfyquant.progress.Progress`. An explicit ``model`` that does not fit the file is a warning (stderr
    and the report's notes), or with ``strict_preset`` an error. Raises :class:`comfyquant.errors.UserError`
    for bad input or usage.
    """
    if plot is not None:
        from comfyquant.convert.plot import require_matplotlib

        require_matplotlib()
    if isinstance(optimizer, str):
        from comfyquant.optimize.config import OptimizerConfig

        optimizer = OptimizerConfig(method=optimizer)
    opts = ConvertOptions(format=format, model=model, layer_config=layer_config, device=device,
                          low_memory=low_memory, force=force, block_size=block_size,
                          progress=as_progress(progress), fallback=fallback, strict_preset=strict_preset,
                          optimizer=optimizer,
                          calibration=str(calibration) if isinstance(calibration, str | Path) else calibration,
                          calibration_lora=None if calibration_lora is None else str(calibration_lora),
                          budget=budget, target_gpu=target_gpu, allow_comfyquant_formats=allow_comfyquant_formats,
                          probe=probe, verify_heldout=verify_heldout)
    result = run_conversion(input, output, opts)
    if report is not None:
        result.to_json(report)
    if plot is not None:
        from comfyquant.convert.plot import plot_sqnr

        plot_sqnr(result, plot)
    return result
