"""The optimizers inside the converter: calibration files, SmoothQuant folding, fallbacks, Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from convert_helpers import leftovers, write
from safetensors.torch import load_file

from comfyquant.calibration import calibrate, save_stats
from comfyquant.convert.api import convert
from comfyquant.errors import UserError
from comfyquant.eval.dit import DigitsDiT, DiTConfig
from comfyquant.formats import dequantize_weight
from comfyquant.io.comfy_meta import decode_comfy_quant
from comfyquant.optimize.config import OptimizerConfig
from comfyquant.optimize.smoothquant import plan_smoothing


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    """A small random Flux-layout DiT, its checkpoint and real calibration statistics from sampling it."""
    torch.manual_seed(0)
    model = DigitsDiT(DiTConfig(hidden=128, depth=1, depth_single=1, context_dim=32, vec_dim=16)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    d = tmp_path_factory.mktemp("dit")
    ckpt = write(d / "dit.safetensors", {k: v.detach().clone() for k, v in model.state_dict().items()})

    def run(m):
        g = torch.Generator().manual_seed(1)
        for t in (0.9, 0.5, 0.1):
            m.velocity(torch.randn(4, 16, 8, 8, generator=g), torch.full((4,), t), torch.arange(4))
    stats = calibrate(model, run, meta={"source": "test sampling"})
    save_stats(stats, d / "calib.safetensors")
    return model, ckpt, d / "calib.safetensors", stats


def test_smoothquant_folding_keeps_the_model_exact(dit):
    model, ckpt, _, stats = dit
    sd = load_file(str(ckpt))
    layers = [k[:-7] for k, v in sd.items() if k.endswith(".weight") and v.dim() == 2 and "conditioner" not in k]
    plan = plan_smoothing(layers, {k: tuple(v.shape) for k, v in sd.items()},
                          lambda n: stats[n].absmax if n in stats else None,
                          lambda n: sd[f"{n}.weight"].abs().amax(0), 0.5)
    assert {g.producer for g in plan.groups} >= {"double_blocks.0.img_mod.lin", "single_blocks.0.modulation.lin"}
    assert "SmoothQuant not applied" in plan.refused["single_blocks.0.linear2"]
    smoothed = DigitsDiT(model.cfg).eval()
    smoothed.load_state_dict({k: plan.rewrite(k, v) for k, v in sd.items()})
    x, t, lab = torch.randn(2, 16, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(smoothed.velocity(x, t, lab), model.velocity(x, t, lab), rtol=1e-4, atol=1e-5)
    # and the smoothed layer's input really is x / s
    s = plan.scales["double_blocks.0.img_attn.qkv"]
    assert float(s.max() / s.min()) > 1.5


def test_convert_with_gptq_smoothquant_bias(dit, tmp_path):
    _, ckpt, calib, _ = dit
    out = tmp_path / "o.safetensors"
    rep = convert(ckpt, out, model="flux", progress=False, calibration=calib,
                  optimizer=OptimizerConfig(method="gptq", smoothquant=True, bias_correction=True))
    quant = [x for x in rep.layers if x.action == "quantize"]
    assert quant and all(x.optimizer == "gptq" and x.optimizer_gain_db > 0 for x in quant)
    assert any("calibration:" in n and "test sampling" in n for n in rep.notes)
    text = rep.to_text()
    assert "optimizer: " in text and "SmoothQuant not applied" in text
    sd = load_file(str(out))
    src = load_file(str(ckpt))
    qkv = "double_blocks.0.img_attn.qkv"
    w = dequantize_weight({"weight": sd[f"{qkv}.weight"], "weight_scale": sd[f"{qkv}.weight_scale"]},
                          decode_comfy_quant(sd[f"{qkv}.comfy_quant"]))
    assert not torch.allclose(w, src[f"{qkv}.weight"].float(), atol=1e-2)  # smoothed: W diag(s)
    assert not torch.equal(sd[f"{qkv}.bias"], src[f"{qkv}.bias"])  # bias-corrected
    assert not torch.equal(sd["double_blocks.0.img_mod.lin.weight"], src["double_blocks.0.img_mod.lin.weight"])


def test_bad_calibration_inputs(dit, tmp_path):
    _, ckpt, calib, _ = dit
    other = write(tmp_path / "other.safetensors", {"blocks.0.attn.weight": torch.randn(64, 64)})
    with pytest.raises(UserError, match="from another model"):
        convert(other, tmp_path / "o.safetensors", model="none", progress=False, calibration=calib,
                optimizer="gptq")
    with pytest.raises(UserError, match="needs --calibration"):
        convert(ckpt, tmp_path / "o.safetensors", progress=False, optimizer="gptq")
    r = subprocess.run([sys.executable, "-m", "comfyquant", "convert", str(ckpt), "-o", str(tmp_path / "x"),
                        "--optimizer", "gptq", "--calibration", str(ckpt)], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a comfyquant calibration" in r.stderr


def test_synthetic_calibration_is_said_in_the_header(dit, tmp_path):
    _, ckpt, _, _ = dit
    rep = convert(ckpt, tmp_path / "o.safetensors", model="flux", progress=False, calibration="synthetic",
                  optimizer="gptq")
    assert rep.notes[0].startswith("calibration: SYNTHETIC")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_mid_optimization_leaves_no_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    inp = write(tmp_path / "m.safetensors", {f"blocks.{i}.linear.weight": torch.randn(256, 256, generator=g)
                                             for i in range(4)})
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "comfyquant", "convert", str(inp), "-o", str(out), "--model",
                             "none", "--optimizer", "learned", "--num-iter", "1000000", "--calibration",
                             "synthetic"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 120
        while not leftovers(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert leftovers(tmp_path) and proc.poll() is None, "the conversion did not start optimizing"
        time.sleep(0.5)  # inside the learned-rounding loop of the first layer (a million steps)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:  # a conversion that outlived the test (once, in CI) must not keep burning the machine's cores
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, err
    assert "interrupted" in err and not out.exists() and leftovers(tmp_path) == []
