"""comfyquant.convert: the converter package.

``comfyquant.convert`` is both this package and the public function ``comfyquant.convert(input, output, ...)``:
importing any submodule binds the package to the attribute ``comfyquant.convert``, so the package itself is
made callable and forwards to :func:`comfyquant.convert.api.convert`.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from comfyquant.convert.api import convert

        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
