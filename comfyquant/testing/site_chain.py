"""Let several ``sitecustomize`` modules run in one process: each runs the next one on ``sys.path``.

Python imports only the first ``sitecustomize`` on ``sys.path``. The ComfyUI server the tests start has its own
(stand-ins for torchvision / torchaudio, :mod:`comfyquant.testing.comfyui_server`) and the test suite adds another
(``tests/int8_guard_site``: children's CPU ``torch._int_mm`` calls counted); each ends by calling
:func:`run_next` so the ones later on the path run too.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def run_next(current_file: str) -> None:
    """Execute the first ``sitecustomize`` on ``sys.path`` after the folder holding ``current_file`` (none: nothing
    happens). Entries before it are not searched again, so a chain of them ends."""
    here = os.path.realpath(os.path.dirname(current_file))
    paths = [os.path.realpath(p or os.curdir) for p in sys.path]
    if here not in paths:
        return
    later = sys.path[paths.index(here) + 1:]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", later)
    if spec is None or spec.loader is None or spec.origin is None:
        return
    if os.path.realpath(spec.origin) == os.path.realpath(current_file):
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
