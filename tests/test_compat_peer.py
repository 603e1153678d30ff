"""The same command lines through convert_to_quant 1.3.4 itself and through comfyquant's compat script, on the
same small float32 Flux-layout file: the same layers quantized, the same comfy_quant settings, weights that
decode to the same precision, the same kept dtypes. Where the peer is wrong (docs/CONVERT_TO_QUANT.md) the test
pins what it does and that comfyquant does the right thing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import peer_cli
import pytest
import torch
from compat_model import SHAPES, save_flux_like
from peer_cli import run_peer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import comfyquant
from comfyquant.cli.convert_to_quant import main
from comfyquant.convert.choices import LayerOptions
from comfyquant.formats import dequantize_weight, quantize_weight
from comfyquant.io.comfy_meta import HEADER_KEY, decode_comfy_quant
from comfyquant.quant.metrics import error_stats

CASES = {
    "fp8": [],
    "int8_row_exclude": ["--int8", "--scaling_mode", "row", "--exclude-layers", "img_mod"],
    # the peer's custom and fallback layers ignore --simple: --*-simple keep them round-to-nearest too
    "fallback": ["--int8", "--fallback", "fp8", "--fallback-simple", "--exclude-layers", "img_mod"],
    "custom": ["--custom-layers", "img_mlp", "--custom-type", "int8", "--custom-scaling-mode", "block",
               "--custom-block-size", "32", "--custom-fpmm", "--custom-simple"],
    "fpmm_input_scale_heur": ["-fpmm", "--input_scale", "--heur"],
    "convrot": ["--int8", "--scaling_mode", "row", "--convrot", "--convrot-group-size", "16"],
    "output_dtype": ["--output-dtype", "float16", "--preserve-layers", "txt_in"],
    "block3d": ["--int8", "--scaling_mode", "block3d", "--block_size", "32"],
    "nvfp4": ["--nvfp4"],
}
# Keys the peer writes that ComfyUI 0.30 does not read (nvfp4's group_size is fixed at 16 by ComfyUI itself).
PEER_ONLY_KEYS = ("orig_dtype", "orig_shape", "per_row")


def _legacy_fp8(path: Path) -> None:
    g = torch.Generator().manual_seed(7)
    save_file({"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
               "a.weight": (torch.randn(32, 32, generator=g) * 40).to(torch.float8_e4m3fn),
               "a.scale_weight": torch.tensor(0.01), "a.scale_input": torch.tensor(0.5),
               "b.weight": (torch.randn(48, 32, generator=g) * 40).to(torch.float8_e4m3fn),
               "b.scale_weight": torch.tensor([0.02]), "norm.weight": torch.ones(32)}, str(path))


def _legacy_int8(path: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(8)
    qt = quantize_weight(torch.randn(64, 32, generator=g) * 0.05, "int8-tensor").tensors
    qr = quantize_weight(torch.randn(48, 32, generator=g) * 0.05, "int8").tensors
    sd = {"t.weight": qt["weight"], "t.scale_weight": qt["weight_scale"],
          "r.weight": qr["weight"], "r.scale_weight": qr["weight_scale"]}
    save_file(sd, str(path))
    return sd


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case through both tools; the peer in one subprocess (one torch import)."""
    d = tmp_path_factory.mktemp("peer")
    model = d / "model.safetensors"
    src = save_flux_like(model)
    _legacy_fp8(d / "fp8.safetensors")
    _legacy_int8(d / "int8.safetensors")
    rot = d / "rot.safetensors"
    g = torch.Generator().manual_seed(1)
    save_file({f"blocks.0.{n}.weight": torch.randn(64, 64, generator=g) for n in ("attn", "mlp")}, str(d / "r.safetensors"))
    comfyquant.convert(d / "r.safetensors", rot, format="int8-rot", model="none", progress=False, layers=LayerOptions())
    jobs = {name: ["-i", model, "--flux2", *flags] for name, flags in CASES.items()}
    jobs["convert_fp8"] = ["-i", d / "fp8.safetensors", "--convert-fp8-scaled", "--full-precision-mm", "--input_scale"]
    jobs["cleanup"] = ["-i", d / "fp8.safetensors", "--cleanup-fp8-scaled", "--scaled-fp8-marker", "2", "--input_scale"]
    jobs["convert_int8"] = ["-i", d / "int8.safetensors", "--convert-int8-scaled"]
    jobs["edit"] = ["-i", rot, "--edit-quant", "--add-keys", "'full_precision_matrix_mult': true", "--quant-filter", "mlp",
                    "--save-quant-metadata"]
    run_peer([[*argv, "-o", d / f"peer_{name}.safetensors"] for name, argv in jobs.items()])
    for name, argv in jobs.items():
        assert main([str(x) for x in argv] + ["--comfy_quant", "-o", str(d / f"ours_{name}.safetensors")]) == 0, name
    return d, src


def _load(d: Path, who: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(d / f"{who}_{name}.safetensors"))


def _confs(sd):
    out = {}
    for k, v in sd.items():
        if k.endswith(".comfy_quant"):
            conf = {c: x for c, x in decode_comfy_quant(v).items() if c not in PEER_ONLY_KEYS}
            if conf["format"] in ("nvfp4", "mxfp8"):
                conf.pop("group_size", None)
            out[k[: -len(".comfy_quant")]] = conf
    return out


def _layer(sd, layer):
    return {k[len(layer) + 1:]: v for k, v in sd.items() if k.startswith(layer + ".") and "." not in k[len(layer) + 1:]}


@pytest.mark.parametrize("case", list(CASES))
def test_same_layers_settings_and_precision(runs, case):
    d, src = runs
    peer, ours = _load(d, "peer", case), _load(d, "ours", case)
    pc, oc = _confs(peer), _confs(ours)
    assert pc == oc
    for layer, conf in oc.items():
        w = src[f"{layer}.weight"]
        p = error_stats(w, dequantize_weight(_layer(peer, layer), decode_comfy_quant(peer[f"{layer}.comfy_quant"])))
        o = error_stats(w, dequantize_weight(_layer(ours, layer), conf))
        if conf["format"] == "nvfp4":  # comfyquant searches each block's scale; the peer rounds it
            assert o.sqnr_db > p.sqnr_db, (layer, o.sqnr_db, p.sqnr_db)
        else:  # both round to nearest with the same scales
            assert abs(o.sqnr_db - p.sqnr_db) < 0.01, (layer, o.sqnr_db, p.sqnr_db)
        extra = set(_layer(peer, layer)) - set(_layer(ours, layer))
        assert extra <= ({"input_scale"} if conf["format"] == "int8_blockwise" else set()), (layer, extra)
        if "input_scale" in _layer(ours, layer):
            assert torch.equal(peer[f"{layer}.input_scale"], ours[f"{layer}.input_scale"])
    for layer in set(SHAPES) - set(oc):  # kept linear weights: the same dtype and values (--output-dtype)
        assert peer[f"{layer}.weight"].dtype == ours[f"{layer}.weight"].dtype, layer
        assert torch.equal(peer[f"{layer}.weight"], ours[f"{layer}.weight"]), layer


def test_convert_fp8_scaled_and_cleanup_match(runs):
    d, _ = runs
    peer, ours = _load(d, "peer", "convert_fp8"), _load(d, "ours", "convert_fp8")
    assert _confs(peer) == _confs(ours) == {n: {"format": "float8_e4m3fn", "full_precision_matrix_mult": True}
                                           for n in ("a", "b")}
    # the same tensors and values (ComfyUI keeps a [1]-shaped scale as it is; the peer makes it a scalar)
    assert set(peer) == set(ours)
    assert all(torch.equal(peer[k].float(), ours[k].float().reshape(peer[k].shape)) for k in peer if "comfy" not in k)
    peer, ours = _load(d, "peer", "cleanup"), _load(d, "ours", "cleanup")
    assert set(peer) == set(ours) and all(torch.equal(peer[k].float(), ours[k].float()) for k in peer
                                          if k != "scaled_fp8")  # the marker's bytes are never read, only its size
    assert ours["scaled_fp8"].numel() == peer["scaled_fp8"].numel() == 2 and float(ours["b.scale_input"]) == 1.0


def test_convert_int8_scaled_peer_misreads_per_tensor_and_per_row(runs):
    d, _ = runs
    src = load_file(str(d / "int8.safetensors"))
    peer, ours = _load(d, "peer", "convert_int8"), _load(d, "ours", "convert_int8")
    # convert_to_quant tests per-row scales against in_features and reads a scalar scale as a block grid
    assert {k: c["format"] for k, c in _confs(peer).items()} == {"t": "int8_blockwise", "r": "int8_blockwise"}
    assert _confs(ours) == {"t": {"format": "int8_tensorwise"}, "r": {"format": "int8_tensorwise"}}
    for layer in ("t", "r"):
        want = src[f"{layer}.weight"].float() * src[f"{layer}.scale_weight"].float().reshape(-1, 1)
        assert torch.equal(dequantize_weight(_layer(ours, layer), _confs(ours)[layer]), want)


def test_edit_quant_keeps_convrot_in_the_header(runs):
    d, _ = runs
    headers = {}
    for who in ("peer", "ours"):
        with safe_open(str(d / f"{who}_edit.safetensors"), "pt") as f:
            headers[who] = json.loads(f.metadata()[HEADER_KEY])["layers"]
    ours = _load(d, "ours", "edit")
    assert _confs(_load(d, "peer", "edit")) == _confs(ours)  # the per-layer configs agree ...
    assert headers["ours"] == {k[: -len(".comfy_quant")]: decode_comfy_quant(v) for k, v in ours.items()
                               if k.endswith(".comfy_quant")}
    assert headers["ours"]["blocks.0.mlp"]["convrot"] is True
    assert "convrot" not in headers["peer"]["blocks.0.mlp"]  # ... the peer's header, which ComfyUI reads, drops convrot


def test_eval_peer_runs_from_this_environment_without_a_venv(tmp_path, monkeypatch) -> None:
    """``eval.peer.run_peer(args, venv=None)`` (bench_optimizers --peer-here, an offline GPU machine with the
    peer installed from carried wheels) runs the peer's CLI in this interpreter: a real RTN conversion whose
    output holds the peer's int8 layer."""
    from comfyquant.eval.peer import run_peer as eval_run_peer

    src = peer_cli.peer_source()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(peer_cli._stubs(src)), str(src)]))
    w = torch.randn(64, 64)
    save_file({"model.diffusion_model.blocks.0.linear.weight": w.bfloat16()}, str(tmp_path / "in.safetensors"))
    eval_run_peer(["-i", str(tmp_path / "in.safetensors"), "-o", str(tmp_path / "out.safetensors"),
                   *peer_cli.COMMON, "--int8", "--scaling-mode", "row"], venv=None, timeout=600)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert out["model.diffusion_model.blocks.0.linear.weight"].dtype == torch.int8
