"""Count the quantized GEMMs a model runs: every bound layer call goes through ``dispatch.bind_linear``'s function,
so wrapping what it returns records each call's output width (the weight's rows)."""

from __future__ import annotations

from typing import Any

import pytest

from comfyquant.runtime.kernels import dispatch


def count_gemms(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that receives the output width of every bound quantized linear call made from now on (weights bound
    before this call are not counted: bind after it)."""
    widths: list[int] = []
    bind = dispatch.bind_linear

    def counting(kind: str, w: Any, *args: Any, **kwargs: Any) -> Any:
        call = bind(kind, w, *args, **kwargs)

        def counted(x: Any, *more: Any, **kw: Any) -> Any:
            widths.append(int(w.shape[0]))
            return call(x, *more, **kw)

        def counted_plain(x: Any, input_act: Any = None) -> Any:  # a layer's plain call (``call.plain``), if it ran
            y = call.plain(x, input_act)
            if y is not None:
                widths.append(int(w.shape[0]))
            return y

        counted.memo, counted.hot, counted.plain = call.memo, call.hot, counted_plain  # type: ignore[attr-defined]
        return counted

    monkeypatch.setattr(dispatch, "bind_linear", counting)
    return widths
