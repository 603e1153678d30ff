"""``comfyquant.convert``: the public Python entry point of the converter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from comfyquant.convert.pipeline import ConvertOptions, run_conversion
from comfyquant.convert.report import Report


def convert_options(*, format: str = "int8", model: str = "auto", layer_config: str | Path | None = None,
                    device: str = "cpu", low_memory: bool = False, force: bool = False, block_size: int = 128,
                    progress: bool = True, fallback: str | None = None, optimizer: Any = None,
                    calibration: Any = None, calibration_lora: str | Path | None = None) -> ConvertOptions:
    """The :class:`ConvertOptions` that :func:`convert`'s keyword arguments describe (a method name for
    ``optimizer`` becomes its default ``OptimizerConfig``; paths become strings)."""
    if isinstance(optimizer, str):
        from comfyquant.optimize.config import OptimizerConfig

        optimizer = OptimizerConfig(method=optimizer)
    return ConvertOptions(format=format, model=model, layer_config=layer_config, device=device,
                          low_memory=low_memory, force=force, block_size=block_size, progress=progress,
                          fallback=fallback, optimizer=optimizer,
                          calibration=str(calibration) if isinstance(calibration, str | Path) else calibration,
                          calibration_lora=None if calibration_lora is None else str(calibration_lora))


def write_outputs(result: Report, report: str | Path | None, plot: str | Path | None) -> None:
    """Write the JSON report and the SQNR plot of a finished conversion, where asked for."""
    if report is not None:
        result.to_json(report)
    if plot is not None:
        from comfyquant.convert.plot import plot_sqnr

        plot_sqnr(result, plot)


def convert(input: str | Path, output: str | Path, format: str = "int8", model: str = "auto",
            layer_config: str | Path | None = None, report: str | Path | None = None,
            plot: str | Path | None = None, device: str = "cpu", low_memory: bool = False,
            force: bool = False, block_size: int = 128, progress: bool = True,
            fallback: str | None = None, optimizer: Any = None, calibration: Any = None,
            calibration_lora: str | Path | None = None) -> Report:
    """Convert a float checkpoint (one .safetensors or a sharded index) into one quantized .safetensors file.

    Writes ``report`` (JSON) and ``plot`` (PNG of per-layer SQNR) when given; returns the :class:`Report`.
    ``fallback`` is where a layer goes when its shape cannot take ``format`` (a format name, or "none" to keep
    it in high precision; default: the format's own fallback, e.g. int8-rot -> int8).
    ``optimizer`` (an ``OptimizerConfig``, or a method name: rtn, gptq, learned, quip) with ``calibration``
    (a file from ``comfyquant calibrate``, or ``"synthetic"``) picks the rounding; ``calibration_lora``
    weights the Hessians toward a LoRA's input directions.
    Raises :class:`comfyquant.errors.UserError` for bad input or usage.
    """
    if plot is not None:
        from comfyquant.convert.plot import require_matplotlib

        require_matplotlib()
    opts = convert_options(format=format, model=model, layer_config=layer_config, device=device,
                           low_memory=low_memory, force=force, block_size=block_size, progress=progress,
                           fallback=fallback, optimizer=optimizer, calibration=calibration,
                           calibration_lora=calibration_lora)
    result = run_conversion(input, output, opts)
    write_outputs(result, report, plot)
    return result
