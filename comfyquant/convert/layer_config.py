"""Per-layer format overrides from a JSON file of regex rules (``--layer-config``), see docs/LAYER_CONFIG.md.

Two file forms are read. comfyquant's own: ``{"rules": [{"pattern": ..., "format": ...}, ...]}`` (or a bare
list of rules), applied in file order, first match wins. convert_to_quant's: ``{"<regex>": {"format": ...},
"_default": {...}}``, applied most-specific-first as convert_to_quant does. Formats are comfyquant CLI names,
ComfyUI format strings (``int8_tensorwise``, ``float8_e4m3fn`` ...) or ``skip``; each rule is validated on load.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfyquant.errors import UserError
from comfyquant.formats import REGISTRY as FORMATS
from comfyquant.formats import get_format
from comfyquant.presets.registry import strip_prefix

# Options a rule may carry besides pattern/format/skip ("group_size" is read as "block_size"). Format options
# go to the format (each only to formats that take it); "align" keeps layers whose dimensions are not
# multiples of it in high precision (0 switches off a global --align for the rule's layers).
RULE_OPTIONS = ("block_size", "convrot_groupsize", "full_precision_matrix_mult", "input_scale", "align")
_INT_OPTIONS = ("block_size", "convrot_groupsize", "align")
_FORMAT_ONLY = ("block_size", "convrot_groupsize", "input_scale")
# convert_to_quant rule keys that carry no meaning for round-to-nearest conversion.
_IGNORED_KEYS = ("simple",)
_SCALING_MODES = {"tensor": "int8-tensor", "axis": "int8", "row": "int8", "block": "int8-block",
                  "block2d": "int8-block"}


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


@dataclass(frozen=True)
class LayerRule:
    """One rule: a regex searched in the layer name, and the format (CLI name) it assigns, or ``skip``."""

    pattern: str
    format: str | None
    skip: bool
    options: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def search(self, name: str, fullmatch: bool = False) -> bool:
        """True when the pattern matches ``name`` (``re.search``, or ``re.fullmatch`` if asked)."""
        rx = _compiled(self.pattern)
        return (rx.fullmatch(name) if fullmatch else rx.search(name)) is not None


@dataclass(frozen=True)
class LayerConfig:
    """Ordered rules plus an optional default for layers no rule matches.

    ``match`` is given a layer name (a trailing ``.weight`` is ignored); a rule matches when its pattern
    matches that name or the name with its checkpoint prefix (``model.diffusion_model.`` ...) stripped.
    """

    rules: tuple[LayerRule, ...]
    default: LayerRule | None = None
    fullmatch: bool = False
    source: str = ""
    strip: Callable[[str], str] | None = None

    @classmethod
    def load(cls, path: str | Path, fullmatch: bool = False) -> LayerConfig:
        """Read and validate a layer-config JSON file; any problem is a UserError naming the file and rule."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read layer config {p}: {e.strerror or e}") from None
        except UnicodeDecodeError:
            raise UserError(f"layer config {p} is not UTF-8 text") from None
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise UserError(f"layer config {p} is not valid JSON ({e})") from None
        return cls.from_obj(obj, source=str(p), fullmatch=fullmatch)

    @classmethod
    def from_obj(cls, obj: Any, source: str = "<layer config>", fullmatch: bool = False) -> LayerConfig:
        """Build from parsed JSON (either file form)."""
        if isinstance(obj, list):
            obj = {"rules": obj}
        if not isinstance(obj, dict):
            raise UserError(f"layer config {source}: expected a JSON object or list, got {type(obj).__name__}")
        if "rules" in obj:
            return _from_native(obj, source, fullmatch)
        return _from_mapping(obj, source, fullmatch)

    def match(self, name: str) -> LayerRule | None:
        """The first rule matching layer ``name``, else the default rule, else None (the preset decides)."""
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        names = [base]
        stripped = self._strip(base)
        if stripped != base:
            names.append(stripped)
        for rule in self.rules:
            if any(rule.search(n, self.fullmatch) for n in names):
                return rule
        return self.default

    def _strip(self, name: str) -> str:
        if self.strip is not None:
            return self.strip(name)
        return strip_prefix(name)[1]


def normalize_format(value: Any, options: Mapping[str, Any], where: str) -> tuple[str | None, bool]:
    """A rule's ``format`` value -> (CLI format name or None, skip). Unknown formats are a UserError."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: 'format' must be a non-empty string (a format name or \"skip\")")
    v = value.strip()
    if v.lower() == "skip":
        return None, True
    if v == "int8" and "scaling_mode" in options:
        return _scaling(options["scaling_mode"], where), False
    if v == "int8_tensorwise":
        if options.get("convrot"):
            return "int8-rot", False
        mode = options.get("scaling_mode", "tensor")
        if mode not in ("tensor", "axis", "row"):
            raise UserError(f"{where}: int8_tensorwise takes scaling_mode tensor or axis/row, not {mode!r}")
        return _SCALING_MODES[mode], False
    fmt = FORMATS.lookup(v)
    if fmt is not None:
        return fmt.name, False
    choices = ", ".join([*FORMATS.names(), "int8_tensorwise", "skip"])
    raise UserError(f"{where}: unknown format {v!r}; choose one of: {choices}")


def _scaling(mode: Any, where: str) -> str:
    if mode not in _SCALING_MODES:
        raise UserError(f"{where}: unknown scaling_mode {mode!r}; choose tensor, axis or block")
    return _SCALING_MODES[mode]


def _check_pattern(pattern: Any, where: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise UserError(f"{where}: 'pattern' must be a non-empty string")
    try:
        re.compile(pattern)
    except re.error as e:
        raise UserError(f"{where}: invalid regex {pattern!r} ({e})") from None
    return pattern


def _options(entry: Mapping[str, Any], where: str, fmt: str | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for key, val in entry.items():
        if key in ("pattern", "format", "skip", "scaling_mode", "convrot") or key.startswith("_"):
            continue
        if key in _IGNORED_KEYS:
            continue
        name = "block_size" if key == "group_size" else key
        if name not in RULE_OPTIONS:
            raise UserError(f"{where}: unknown option {key!r}; allowed: pattern, format, skip, "
                            f"scaling_mode, convrot, {', '.join(RULE_OPTIONS)}, group_size")
        if name in _INT_OPTIONS:
            low = 0 if name == "align" else 1
            if not isinstance(val, int) or isinstance(val, bool) or val < low:
                kind = "a non-negative" if low == 0 else "a positive"
                raise UserError(f"{where}: {key} must be {kind} integer, got {val!r}")
        elif not isinstance(val, bool):
            raise UserError(f"{where}: {key} must be true or false, got {val!r}")
        opts[name] = val
    if fmt is not None:
        takes = get_format(fmt).options
        for name in _FORMAT_ONLY:
            if name in opts and name not in takes:
                users = [f.name for f in FORMATS.formats() if name in f.options]
                raise UserError(f"{where}: {name} applies to {', '.join(users)} only, not {fmt}")
    if "convrot_groupsize" in opts:
        g = opts["convrot_groupsize"]
        if g < 16 or g & (g - 1) or (g.bit_length() - 1) % 2:
            raise UserError(f"{where}: convrot_groupsize must be a power of 4 >= 16, got {g}")
    return opts


def _rule(pattern: Any, entry: Any, where: str) -> LayerRule:
    """Validate one rule entry (``{"format": ..., "skip": ..., options}``)."""
    pattern = _check_pattern(pattern, where)
    where = f"{where} ({pattern!r})"
    if isinstance(entry, str):
        entry = {"format": entry}
    if not isinstance(entry, Mapping):
        raise UserError(f"{where}: a rule must be an object, got {type(entry).__name__}")
    skip = entry.get("skip", False)
    if not isinstance(skip, bool):
        raise UserError(f"{where}: 'skip' must be true or false")
    if skip:
        fmt = None
    elif "format" not in entry:
        raise UserError(f"{where}: missing 'format' (or set \"skip\": true)")
    else:
        fmt, skip = normalize_format(entry["format"], entry, where)
    return LayerRule(pattern, fmt, skip, _options(entry, where, fmt), where)


def make_rule(pattern: str, format: str, where: str, **options: Any) -> LayerRule:
    """One validated rule built in code (the command line's ``--rule`` and the compat script's custom layers):
    ``format`` is a format name or ``skip``, ``options`` rule options as in a layer-config file."""
    return _rule(pattern, {"format": format, **options}, where)


_RULE_TEXT = re.compile(r"^(?P<pattern>.+?)=(?P<format>[A-Za-z0-9_.\-]+)(?P<options>(?:,[a-z_]+=[^,=]+)*)$")


def parse_rule(text: str, where: str = "--rule") -> LayerRule:
    """``PATTERN=FORMAT[,option=value...]`` (e.g. ``attn=int8-block,block_size=64`` or ``^img_in$=skip``)."""
    m = _RULE_TEXT.match(text.strip())
    if m is None:
        raise UserError(f"{where} {text!r}: expected PATTERN=FORMAT[,option=value...], e.g. 'mlp=int8-block,"
                        "block_size=64' or 'img_in=skip'")
    return make_rule(m["pattern"], m["format"], f"{where} {text!r}", **parse_options(m["options"], where))


def parse_format_spec(text: str, where: str) -> LayerRule:
    """``FORMAT[,option=value...]`` as a rule matching every layer (``--excluded-format``)."""
    fmt, _, rest = text.strip().partition(",")
    return make_rule(".*", fmt, f"{where} {text!r}", **parse_options("," + rest if rest else "", where))


def parse_options(text: str, where: str) -> dict[str, Any]:
    """``,key=value,...`` -> options (integers, true/false); each is validated by the rule it goes into."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"{where}: option {item!r} is not key=value")
        v = value.strip()
        out[key.strip()] = True if v.lower() == "true" else False if v.lower() == "false" else _int(v, key, where)
    return out


def _int(value: str, key: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{where}: option {key}={value!r} must be an integer, true or false") from None


def _from_native(obj: Mapping[str, Any], source: str, fullmatch: bool) -> LayerConfig:
    rules_obj = obj["rules"]
    if not isinstance(rules_obj, list):
        raise UserError(f"layer config {source}: 'rules' must be a list")
    unknown = [k for k in obj if k not in ("rules", "default", "fullmatch", "format_version")
               and not k.startswith("_")]
    if unknown:
        raise UserError(f"layer config {source}: unknown top-level key {unknown[0]!r}")
    rules = []
    for i, entry in enumerate(rules_obj, 1):
        where = f"layer config {source}: rule {i}"
        if not isinstance(entry, Mapping):
            raise UserError(f"{where}: a rule must be an object, got {type(entry).__name__}")
        rules.append(_rule(entry.get("pattern"), entry, where))
    default = None
    if obj.get("default") is not None:
        default = _rule(".*", obj["default"], f"layer config {source}: default")
    fm = obj.get("fullmatch", fullmatch)
    if not isinstance(fm, bool):
        raise UserError(f"layer config {source}: 'fullmatch' must be true or false")
    return LayerConfig(tuple(rules), default, fm, source)


def _from_mapping(obj: Mapping[str, Any], source: str, fullmatch: bool) -> LayerConfig:
    rules = [_rule(key, entry, f"layer config {source}: rule")
             for key, entry in obj.items() if not key.startswith("_")]
    order = sorted(range(len(rules)), key=lambda i: specificity(rules[i].pattern))
    default = None
    if isinstance(obj.get("_default"), Mapping):
        default = _rule(".*", obj["_default"], f"layer config {source}: _default")
    return LayerConfig(tuple(rules[i] for i in order), default, fullmatch, source)


def specificity(pattern: str) -> tuple[int, int]:
    """Sort key for convert_to_quant's mapping form: patterns naming a block number with >= 8 literal
    characters first, then longer literal text first (its documented most-specific-wins order)."""
    literal = re.sub(r"\\.|\[.*?\]|\(.*?\)|[.*+?^${}|\\]", "", pattern)
    has_number = re.search(r"\d|\\d", pattern) is not None
    tier = 0 if has_number and len(literal) >= 8 else 1
    return (tier, -len(literal))


def rules_to_json(rules: Sequence[Mapping[str, Any]], **top: Any) -> str:
    """Serialise comfyquant's native form (used by the template writer)."""
    return json.dumps({"format_version": 1, **top, "rules": list(rules)}, indent=2) + "\n"
