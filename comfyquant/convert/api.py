"""``comfyquant.convert``: the public Python entry point of the converter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comfyquant.convert.choices import LayerOptions
from comfyquant.convert.pipeline import ConvertOptions, run_conversion
from comfyquant.convert.report import Report
from comfyquant.progress import Progress, as_progress


def convert_options(output: str | Path, *, format: str = "int8", model: str = "auto",
                    layer_config: str | Path | None = None, device: str = "cpu", low_memory: bool = False,
                    force: bool = False, block_size: int = 128, progress: bool | Progress = True,
                    fallback: str | None = None, strict_preset: bool = False, optimizer: Any = None,
                    calibration: Any = None, calibration_lora: str | Path | None = None,
                    layers: LayerOptions | None = None, merge_loras: Sequence[str | Path] = (),
                    merge_lora_scale: float = 1.0, merge_lora_dampen: bool = True, extract_lora: int = 0,
                    extract_lora_output: str | Path | None = None,
                    extract_lora_target: str | None = None, budget: Any = None, target_gpu: str | None = None,
                    allow_comfyquant_formats: bool = False, probe: Any = None,
                    verify_heldout: bool = True, auto_confidence: float | None = None,
                    auto_margin_db: float | None = None) -> ConvertOptions:
    """The :class:`ConvertOptions` that :func:`convert`'s keyword arguments describe for a conversion to
    ``output`` (a method name for ``optimizer`` becomes its default ``OptimizerConfig``; paths become strings;
    LoRA merging and extraction become the pipeline's weight transform and error sink)."""
    if isinstance(optimizer, str):
        from comfyquant.optimize.config import OptimizerConfig

        optimizer = OptimizerConfig(method=optimizer)
    transform = sink = None
    if merge_loras:
        from comfyquant.lora.merge import LoRAMerge, LoraSpec, MergeConfig

        transform = LoRAMerge(MergeConfig(tuple(LoraSpec.parse(x) for x in merge_loras), merge_lora_scale,
                                          merge_lora_dampen))
    if extract_lora:
        from comfyquant.lora.extract import QuantErrorLoRA

        sink = QuantErrorLoRA.for_output(output, extract_lora, extract_lora_output, force=force,
                                         target=extract_lora_target)
    return ConvertOptions(format=format, model=model, layer_config=layer_config, device=device,
                          low_memory=low_memory, force=force, block_size=block_size,
                          progress=as_progress(progress), fallback=fallback, strict_preset=strict_preset,
                          optimizer=optimizer,
                          calibration=str(calibration) if isinstance(calibration, str | Path) else calibration,
                          calibration_lora=None if calibration_lora is None else str(calibration_lora),
                          layers=layers or LayerOptions(), weight_transform=transform, quant_error_sink=sink,
                          budget=budget, target_gpu=target_gpu, allow_comfyquant_formats=allow_comfyquant_formats,
                          probe=probe, verify_heldout=verify_heldout, auto_confidence=auto_confidence,
                          auto_margin_db=auto_margin_db)


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
            force: bool = False, block_size: int = 128, progress: bool | Progress = True,
            fallback: str | None = None, strict_preset: bool = False, optimizer: Any = None,
            calibration: Any = None, calibration_lora: str | Path | None = None,
            layers: LayerOptions | None = None, merge_loras: Sequence[str | Path] = (),
            merge_lora_scale: float = 1.0, merge_lora_dampen: bool = True, extract_lora: int = 0,
            extract_lora_output: str | Path | None = None, extract_lora_target: str | None = None,
            budget: Any = None, target_gpu: str | None = None, allow_comfyquant_formats: bool = False,
            probe: Any = None, verify_heldout: bool = True, auto_confidence: float | None = None,
            auto_margin_db: float | None = None) -> Report:
    """Convert a float checkpoint (one .safetensors or a sharded index) into one quantized .safetensors file.

    Writes ``report`` (JSON) and ``plot`` (PNG of per-layer SQNR) when given; returns the :class:`Report`.
    ``fallback`` is where a layer goes when its shape cannot take ``format`` (a format name, or "none" to keep
    it in high precision; default: the format's own fallback, e.g. int8-rot -> int8). ``layers`` holds the
    per-layer choices (command-line rules, exclusions, ``keep_dtype``, format options, alignment).
    ``optimizer`` (an ``OptimizerConfig``, or a method name: rtn, gptq, learned, quip) with ``calibration``
    (a file from ``comfyquant calibrate``, or ``"synthetic"``) picks the rounding; ``calibration_lora``
    weights the Hessians toward a LoRA's input directions.
    ``merge_loras`` (``"A.safetensors"`` or ``"A.safetensors:SCALE"``) are merged into the float weights first,
    in float32 per layer, each at its scale x ``merge_lora_scale`` (x 0.9^(i-1) for the i-th unless
    ``merge_lora_dampen`` is False); the optimizers see the merged weights. ``extract_lora`` > 0 also writes the
    rank-r SVD of each quantized layer's error as a LoRA (``extract_lora_output``, default
    ``<output stem>_qerr_r<rank>.safetensors``; only layers matching the regex ``extract_lora_target``).
    ``format="auto"`` chooses every layer's format to meet ``budget`` (``"size=0.4"``, ``"psnr=45"``, ...; see
    docs/AUTO_PRECISION.md) among the registry's formats for ``target_gpu`` (``allow_comfyquant_formats``: also
    those stock ComfyUI cannot load); ``calibration`` gives the layer statistics, ``probe`` (an
    ``autoprec.Probe``, e.g. ``comfyquant.eval.autoprobe.probe_for(input)``) the end-to-end weights and the
    held-out check. A ``psnr``/``cosine`` floor must hold on the ``auto_confidence`` (default 0.95) one-sided
    lower confidence bound of the calibration items' mean plus ``auto_margin_db`` dB (default 0.5; both
    ``autoprec.AutoConfig``). The plan is in ``Report.auto`` and the file's ``__metadata__["comfyquant.auto"]``.
    ``progress``: True (a bar on a terminal, else lines on stderr), False (none) or a
    :class:`comfyquant.progress.Progress`. An explicit ``model`` that does not fit the file is a warning (stderr
    and the report's notes), or with ``strict_preset`` an error. Raises :class:`comfyquant.errors.UserError`
    for bad input or usage.
    """
    if plot is not None:
        from comfyquant.convert.plot import require_matplotlib

        require_matplotlib()
    opts = convert_options(output, format=format, model=model, layer_config=layer_config, device=device,
                           low_memory=low_memory, force=force, block_size=block_size, progress=progress,
                           fallback=fallback, strict_preset=strict_preset, optimizer=optimizer,
                           calibration=calibration, calibration_lora=calibration_lora, layers=layers,
                           merge_loras=merge_loras, merge_lora_scale=merge_lora_scale,
                           merge_lora_dampen=merge_lora_dampen, extract_lora=extract_lora,
                           extract_lora_output=extract_lora_output, extract_lora_target=extract_lora_target,
                           budget=budget, target_gpu=target_gpu, allow_comfyquant_formats=allow_comfyquant_formats,
                           probe=probe, verify_heldout=verify_heldout, auto_confidence=auto_confidence,
                           auto_margin_db=auto_margin_db)
    result = run_conversion(input, output, opts)
    write_outputs(result, report, plot)
    return result
