"""``comfyquant template`` (convert_to_quant's ``--dry-run create-template``): a ``--layer-config`` file listing
every linear weight of a model with its shape and the format the preset plans for it, ready to edit.

Loading the template unchanged as ``--layer-config`` reproduces the preset's plan exactly.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from comfyquant.convert.cast import cast_of_kept
from comfyquant.convert.choices import LayerOptions
from comfyquant.convert.layer_config import rules_to_json
from comfyquant.convert.plan import CAST, DROP, KEEP, QUANTIZE, PlanOptions, build_plan
from comfyquant.convert.preset_check import preset_warning
from comfyquant.errors import UserError
from comfyquant.formats import REGISTRY as FORMATS
from comfyquant.io.reader import CheckpointReader
from comfyquant.io.writer import write_small_file
from comfyquant.progress import Progress

COMMENT = ("comfyquant layer config: rules apply in order, first match wins; 'pattern' is a regex searched in "
           "the layer name (with or without the checkpoint prefix). Set 'format' to one of "
           + ", ".join(FORMATS.names()) + " or \"skip\": true to keep a layer in high precision. Keys starting with '_' "
           "are comments. See docs/LAYER_CONFIG.md.")


def template_rules(input: str | Path, model: str = "auto", fmt: str = "int8", block_size: int = 128,
                   layer_config: str | Path | None = None, layers: LayerOptions | None = None,
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rules (one per 2-D linear weight, anchored to its exact name) and the template's comment fields;
    ``layer_config`` and ``layers`` fold their decisions in (the formats they choose, not their options)."""
    reader = CheckpointReader(input)
    opts = PlanOptions(format=fmt, model=model, layer_config=layer_config, block_size=block_size,
                       layers=layers or LayerOptions())
    plan = build_plan(reader.infos, opts, metadata=reader.metadata)
    rules: list[dict[str, Any]] = []
    dropped = 0
    for e in plan.entries:
        if e.action == DROP:
            dropped += 1
            continue
        if not (e.name.endswith(".weight") and len(e.shape) == 2):
            continue
        rule: dict[str, Any] = {"pattern": f"^{re.escape(e.layer)}$"}
        if e.action == KEEP or cast_of_kept(e):  # kept out of quantization (a cast format still casts it)
            rule["skip"] = True
        elif e.action in (QUANTIZE, CAST):
            rule["format"] = e.format
        rule.update({"_shape": list(e.shape), "_planned_by": e.rule, "_reason": e.reason})
        rules.append(rule)
    top = {"_comment": COMMENT, "_source": str(reader.path), "_model": plan.preset, "_format": plan.format,
           "_dropped_by_preset": dropped}
    return rules, top


def write_template(input: str | Path, output: str | Path, model: str = "auto", fmt: str = "int8",
                   block_size: int = 128, force: bool = False, layer_config: str | Path | None = None,
                   strict_preset: bool = False, progress: Progress | None = None,
                   layers: LayerOptions | None = None) -> int:
    """Write the template JSON to ``output`` (atomically; an existing file only with ``force``); returns the
    number of rules written. An explicit ``model`` that does not fit the file is warned about (``progress``,
    and a ``_preset_warning`` field in the file), or with ``strict_preset`` refused."""
    out = Path(output)
    reader_files = CheckpointReader(input).files
    if any(out.exists() and out.samefile(f) for f in reader_files):
        raise UserError(f"output {out} is the input checkpoint; choose a .json path")
    if out.exists() and not force:
        raise UserError(f"output exists: {out}; choose another path or delete it first")
    warning = preset_warning(input, model, strict_preset, progress or Progress())
    rules, top = template_rules(input, model, fmt, block_size, layer_config, layers)
    if warning is not None:
        top["_preset_warning"] = warning
    if not rules:
        raise UserError(f"{input}: no 2-D linear weights to list in a layer-config template")
    write_small_file(out, rules_to_json(rules, **top))
    return len(rules)
