"""``comfyquant install-nodes COMFYUI_DIR``: put the node pack into ComfyUI's ``custom_nodes/comfyquant/``.

The folder gets the same entry file as the repository root (so a clone into ``custom_nodes/`` works the same
way) and the ``comfyquant`` package next to it: a symbolic link to this installation (default; edits and
upgrades show up in ComfyUI) or a copy (``--copy``; ComfyUI then needs nothing else installed). The folder is
built beside the target and renamed into place; a folder left by an earlier install is replaced, anything
else is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from comfyquant.errors import UserError

PACK_NAME = "comfyquant"
MARKER = ".comfyquant-install.json"
EXAMPLE_MODEL = "comfyquant_digits_dit.safetensors"

ENTRY_FILE = '''"""ComfyUI entry point of the comfyquant node pack (custom_nodes/<this folder>/__init__.py).

Used as is when this repository is cloned into ComfyUI's custom_nodes/, and written by `comfyquant install-nodes`.
It imports the comfyquant package that sits next to this file (else the one installed in ComfyUI's Python).
"""

import importlib.util
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_pkg = os.path.join(_here, "comfyquant")
if "comfyquant" not in sys.modules and os.path.isfile(os.path.join(_pkg, "__init__.py")):
    _spec = importlib.util.spec_from_file_location("comfyquant", os.path.join(_pkg, "__init__.py"),
                                                   submodule_search_locations=[_pkg])
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["comfyquant"] = _module
    _spec.loader.exec_module(_module)

from comfyquant.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def package_dir() -> Path:
    """The ``comfyquant`` package folder of this installation."""
    return Path(__file__).resolve().parent.parent


def _ignore(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))]


def _replaceable(target: Path, force: bool) -> None:
    if not os.path.lexists(target):
        return
    if (target / MARKER).is_file() or force:
        return
    raise UserError(f"{target} exists and was not made by 'comfyquant install-nodes'; move it away or pass --force")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def install_nodes(comfyui_dir: str | Path, *, copy: bool = False, force: bool = False,
                  example_model: bool = False) -> Path:
    """Install the node pack; returns the ``custom_nodes/comfyquant`` folder."""
    root = Path(comfyui_dir).expanduser().resolve()
    custom = root / "custom_nodes"
    if not custom.is_dir():
        raise UserError(f"{root} has no custom_nodes/ folder; pass the ComfyUI folder (the one with main.py), "
                        "or its --base-directory")
    target = custom / PACK_NAME
    _replaceable(target, force)
    src = package_dir()
    tmp = custom / f".{PACK_NAME}.tmp-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        (tmp / "__init__.py").write_text(ENTRY_FILE)
        if copy:
            shutil.copytree(src, tmp / PACK_NAME, ignore=_ignore)
        else:
            os.symlink(src, tmp / PACK_NAME, target_is_directory=True)
        info = {"mode": "copy" if copy else "link", "source": str(src)}
        (tmp / MARKER).write_text(json.dumps(info, indent=1))
        _remove(target)
        os.replace(tmp, target)
    except OSError as e:
        raise UserError(f"cannot install into {target}: {e.strerror or e}") from None
    finally:
        _remove(tmp)
    if example_model:
        _install_example_model(root, copy)
    return target


def _install_example_model(root: Path, copy: bool) -> Path:
    from comfyquant.nodes.digits import DIT_ASSET

    dest_dir = root / "models" / "diffusion_models"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / EXAMPLE_MODEL
    _remove(dest)
    if copy:
        shutil.copyfile(DIT_ASSET, dest)
    else:
        os.symlink(DIT_ASSET, dest)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    """``comfyquant install-nodes`` (argv without the command name)."""
    p = argparse.ArgumentParser(prog="comfyquant install-nodes",
                                description="Install comfyquant's node pack into ComfyUI's custom_nodes/.")
    p.add_argument("comfyui_dir", metavar="COMFYUI_DIR", help="ComfyUI folder (holding custom_nodes/)")
    p.add_argument("--copy", action="store_true", help="copy the package instead of linking to this installation")
    p.add_argument("--force", action="store_true", help="replace an existing custom_nodes/comfyquant of other origin")
    p.add_argument("--example-model", action="store_true",
                   help=f"also put the bundled digits DiT into models/diffusion_models/{EXAMPLE_MODEL}")
    a = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    target = install_nodes(a.comfyui_dir, copy=a.copy, force=a.force, example_model=a.example_model)
    print(f"comfyquant: node pack installed in {target} ({'copied' if a.copy else 'linked'}); restart ComfyUI",
          file=sys.stderr)
    return 0
