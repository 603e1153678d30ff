"""Train the digits DiT (rectified flow on sklearn's digits) and write the weights fixture.

Rebuild the committed fixture (GPU, a few minutes; the exact command is in docs/QUALITY.md and in the
file's ``__metadata__``)::

    python -m comfyquant.eval.train_dit --out DIR --steps 20000 --stop-after 10501 --seed 0 --device cuda

(The committed file came from ``--steps 20000 --max-seconds 300``, which stopped after 10,501 steps on an
H200; ``--stop-after 10501`` replays exactly that schedule without the wall-clock cap.)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from comfyquant.eval.data import load_digits, to_latent
from comfyquant.eval.dit import DigitsDiT, DiTConfig
from comfyquant.eval.sampling import class_labels, flow_loss, initial_noise, sample


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; recorded in the fixture's metadata."""

    steps: int = 30000
    batch: int = 256
    lr: float = 5e-4
    warmup: int = 500
    ema: float = 0.9995
    seed: int = 0
    device: str = "cpu"
    max_seconds: float = 0.0  # safety cap on wall time (0: none); the steps actually run are recorded
    stop_after: int = 0  # run only this many steps of the ``steps``-long schedule (0: all); rebuilds a capped run


def init_weights(model: DigitsDiT, seed: int) -> None:
    """Seeded init: Xavier linears, adaLN-Zero (modulation and output layers start at zero)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("scale"):
            continue
        with torch.no_grad():
            if p.dim() == 2 and not name.startswith("conditioner."):
                bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
                p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
            elif name.startswith("conditioner."):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.zero_()
    for m in model.modules():
        if hasattr(m, "lin"):
            nn.init.zeros_(m.lin.weight)
    nn.init.zeros_(model.final_layer.adaLN_modulation[1].weight)
    nn.init.zeros_(model.final_layer.linear.weight)


def train(model_cfg: DiTConfig, cfg: TrainConfig, log_every: int = 500) -> tuple[DigitsDiT, int]:
    """Train; return the EMA model (fp32, on the CPU) and the number of steps run."""
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    data = load_digits()
    x_all = to_latent(data.images).to(dev)
    y_all = data.labels.to(dev)
    model = DigitsDiT(model_cfg)
    init_weights(model, cfg.seed)
    model.to(dev)
    ema = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    start = time.time()
    ema_params, params = list(ema.parameters()), list(model.parameters())
    step = 0
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, x_all.shape[0], (cfg.batch,), generator=gen, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = flow_loss(model.velocity, x_all[idx], y_all[idx], model_cfg.num_classes, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        if cfg.stop_after and step + 1 >= cfg.stop_after:
            print(f"stopping after {step + 1} steps (--stop-after)", flush=True)
            break
        if step % log_every == 0 or step == cfg.steps - 1:
            print(f"step {step} loss {loss.item():.4f} lr {lr:.2e} {time.time() - start:.0f}s", flush=True)
            if cfg.max_seconds and time.time() - start > cfg.max_seconds:
                print(f"stopping at step {step}: --max-seconds {cfg.max_seconds} reached", flush=True)
                break
    return ema.cpu().float(), step + 1


def save_fixture(model: DigitsDiT, path: Path, cfg: TrainConfig, command: str, steps_run: int) -> None:
    """Write bf16 weights with the config, seed and command in the safetensors metadata."""
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    meta = {"comfyquant_model": "digits-dit", "dit_config": json.dumps(model.cfg.to_dict()),
            "train_config": json.dumps(cfg.__dict__), "train_command": command, "steps_run": str(steps_run),
            "data": "sklearn.datasets.load_digits (1797 images), bilinear to 32x32, 4x4 pixel-unshuffle"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)


def save_preview(model: DigitsDiT, path: Path, device: str) -> None:
    """A 10x10 grid of samples (one row per class) for a visual check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = class_labels(model.cfg.num_classes, 10)
    noise = initial_noise(len(labels), (16, 8, 8), 1234)
    m = model.to(device)
    imgs = sample(m.velocity, labels.to(device), model.cfg.num_classes, noise.to(device), 20, 3.0).cpu()
    grid = imgs[:, 0].reshape(10, 10, 32, 32).permute(0, 2, 1, 3).reshape(320, 320)
    plt.imsave(path, grid.numpy(), cmap="gray", vmin=-1, vmax=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch", type=int, default=TrainConfig.batch)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--stop-after", type=int, default=0, help="stop after N steps of the --steps schedule")
    p.add_argument("--max-seconds", type=float, default=0.0, help="safety cap on training wall time")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=DiTConfig.hidden)
    p.add_argument("--depth", type=int, default=DiTConfig.depth)
    p.add_argument("--depth-single", type=int, default=DiTConfig.depth_single)
    args = p.parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else argv
    model_cfg = DiTConfig(hidden=args.hidden, depth=args.depth, depth_single=args.depth_single)
    cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, device=args.device,
                      max_seconds=args.max_seconds, stop_after=args.stop_after)
    model, steps_run = train(model_cfg, cfg)
    command = "python -m comfyquant.eval.train_dit " + " ".join(argv_list)
    save_fixture(model, args.out / "digits_dit.safetensors", cfg, command, steps_run)
    save_preview(model, args.out / "preview.png", args.device)
    print(f"wrote {args.out / 'digits_dit.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
