"""Edits of per-layer ``comfy_quant`` configs: keys added (``--add-keys``), a layer filter, and the check that
chosen layers are stored in high precision (``--hp-filter``). Pure functions over ``{layer: config}``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from comfyquant.errors import UserError

# comfy_quant keys that say how the stored bytes decode (ComfyUI's loader reads them to build the weight);
# changing one without re-quantizing makes the layer compute garbage.
DECODE_KEYS = ("format", "convrot", "convrot_groupsize", "group_size", "linear_dtype", "params")
_ITEM = re.compile(r"""\s*(?:'(?P<sq>[^']*)'|"(?P<dq>[^"]*)"|(?P<bare>[A-Za-z_][\w.]*))\s*:\s*"""
                   r"""(?P<value>'[^']*'|"[^"]*"|[^,]+?)\s*(?:,|$)""")


def parse_add_keys(text: str, where: str = "--add-keys") -> dict[str, Any]:
    """``'key': value, ...`` (convert_to_quant's form; quotes optional on keys) -> dict. Values: quoted
    strings, true/false, integers, floats; a bare word is read as a string."""
    out: dict[str, Any] = {}
    pos, text = 0, text.strip().removeprefix("{").removesuffix("}").strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if m is None:
            raise UserError(f"{where}: cannot read {text[pos:]!r}; expected 'key': value pairs separated by commas, "
                            "e.g. \"'full_precision_matrix_mult': true\"")
        key = m["sq"] if m["sq"] is not None else m["dq"] if m["dq"] is not None else m["bare"]
        out[key] = _value(m["value"].strip())
        pos = m.end()
    if not out:
        raise UserError(f"{where}: no 'key': value pairs given")
    return out


def _value(v: str) -> Any:
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def select_layers(layers: Iterable[str], pattern: str | None, where: str = "--quant-filter") -> list[str]:
    """The layers a regex finds (``re.search``), all of them when ``pattern`` is None."""
    names = list(layers)
    if pattern is None:
        return names
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UserError(f"{where}: invalid regex {pattern!r} ({e})") from None
    return [n for n in names if rx.search(n)]


def add_config_keys(configs: Mapping[str, dict[str, Any]], keys: Mapping[str, Any],
                    layers: Iterable[str]) -> dict[str, int]:
    """Set ``keys`` in the configs of ``layers`` (in place); returns, per key, how many configs changed.

    A key that decides how the stored tensors decode (``format``, ``convrot``, ``group_size``, ...) may only be
    set to the value a layer already has: changing it without re-quantizing would break the layer.
    """
    chosen = list(layers)
    for key, value in keys.items():
        if key in DECODE_KEYS:
            bad = [n for n in chosen if configs[n].get(key) != value]
            if bad:
                raise UserError(f"--add-keys: '{key}' decides how the stored weights decode; setting it to {value!r} "
                                f"would break {len(bad)} layer(s) ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                                "without re-quantizing them; convert the float checkpoint again instead")
    counts: dict[str, int] = {}
    for key, value in keys.items():
        n = 0
        for layer in chosen:
            if configs[layer].get(key, object()) != value:
                configs[layer][key] = value
                n += 1
        counts[key] = n
    return counts


def check_high_precision(quantized: Iterable[str], pattern: str, where: str = "--hp-filter") -> None:
    """UserError naming every quantized layer the regex finds: those must be stored in high precision."""
    hits = select_layers(quantized, pattern, where)
    if hits:
        raise UserError(f"{where} {pattern!r}: {len(hits)} layer(s) that should be in high precision are "
                        f"quantized: {', '.join(hits)}; regenerate the file with those layers excluded")
