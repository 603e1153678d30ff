"""ComfyUI entry point of the comfyquant node pack (custom_nodes/<this folder>/__init__.py).

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
