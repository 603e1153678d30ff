"""Draw where each issue-12 target stands (``docs/targets.json``: the latest measured figure per target, run and
device) as one PNG: whole-model speed-ups against their bars on the left, per-layer counts on the right; a bar
met is green, missed red, its run and device written on it.

    python benchmarks/plot_targets.py [--json docs/targets.json] [--out docs/img/targets_latest.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MET, MISSED, BAR = "#2e8b57", "#c0392b", "#333333"


def plot(data: dict, out: Path) -> None:
    """Write the two-panel figure of ``data`` (``targets.json``'s form) to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models, counts = data["whole_models"], data["counts"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.5), gridspec_kw={"width_ratios": [1.15, 1]})
    for ax, rows in ((left, models), (right, counts)):
        y = list(range(len(rows)))[::-1]
        ratio = [r["value"] / r["of"] for r in rows] if ax is right else [r["value"] for r in rows]
        bars = [r["bar"] / r["of"] for r in rows] if ax is right else [r["bar"] for r in rows]
        colors = [MET if r["value"] >= r["bar"] else MISSED for r in rows]
        ax.barh(y, ratio, color=colors, height=0.6)
        for yi, b in zip(y, bars, strict=True):
            ax.plot([b, b], [yi - 0.4, yi + 0.4], color=BAR, linewidth=2.5)
        for yi, r, v, b in zip(y, rows, ratio, bars, strict=True):  # the label past the bar and its mark
            text = (f"{r['value']}/{r['of']}" if ax is right else f"{r['value']:.2f}x") + f"  run {r['run']}, {r['device']}"
            ax.text(max(v, b) + 0.015 * (max(ratio) + 0.2), yi, text, va="center", fontsize=9)
        labels = [r["target"] + ("" if ax is right else f"\n({r['where']})") for r in rows]
        ax.set_yticks(y, labels, fontsize=9)
        ax.set_xlim(0, max(max(ratio), max(bars)) * (2.1 if ax is right else 1.6))  # room for the labels
    left.set_xlabel("speed-up over bf16 in the same run (black mark: the target)")
    left.set_title("Whole models, eager unless stated")
    right.set_xlabel("share of rows meeting the bar (black mark: the target)")
    right.set_title("Per-layer sweep counts")
    fig.suptitle(f"Issue {data['issue']} targets: latest measured ({data['updated']}); green met, red not met",
                 fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")  # the labels past the right panel's bars stay in the image
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "targets.json")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "targets_latest.png")
    a = p.parse_args(argv)
    plot(json.loads(a.json.read_text()), a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
