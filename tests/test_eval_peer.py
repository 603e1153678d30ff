"""The peer command lines the eval runs: the same on-disk format as comfyquant's, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfyquant.errors import UserError
from comfyquant.eval.peer import peer_args


def test_peer_flags_per_format() -> None:
    a = peer_args(Path("in.safetensors"), Path("out.safetensors"), "int8-rot", "simple")
    assert a[:4] == ["-i", "in.safetensors", "-o", "out.safetensors"]
    assert {"--comfy_quant", "--int8", "--convrot", "--simple"} <= set(a)
    assert a[a.index("--scaling-mode") + 1] == "row"  # without it the peer writes a plain per-tensor file
    fp8 = peer_args(Path("i"), Path("o"), "fp8", "default")
    assert "--int8" not in fp8 and "--simple" not in fp8


def test_unknown_peer_format_or_setting_is_a_user_error() -> None:
    with pytest.raises(UserError, match="no peer equivalent"):
        peer_args(Path("i"), Path("o"), "int8-block")
    with pytest.raises(UserError, match="unknown peer setting"):
        peer_args(Path("i"), Path("o"), "int8", "quip")
