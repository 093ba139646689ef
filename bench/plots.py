"""PNG plots of the benchmark results (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _xs(curve: dict) -> tuple[list[int], list[float]]:
    pts = sorted((int(k), v) for k, v in curve.items() if v is not None)
    return [p[0] for p in pts], [100 * p[1] for p in pts]


def learning_curves(summary: dict, path: Path, *, target: int = 16) -> Path:
    """Data efficiency: held-out acceptance after N feedback events, one line per persona."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, p in summary["personas"].items():
        x, y = _xs(p["curve"])
        ax.plot(x, y, marker="o", label=name)
    ax.axhline(90, color="grey", ls="--", lw=0.8)
    ax.axvline(target, color="grey", ls=":", lw=0.8)
    ax.set(xlabel="feedback events (all kinds, one adapter growing)", ylabel="held-out acceptance (%)", ylim=(-3, 103),
           title="Data efficiency: acceptance by the persona's own judge")
    ax.set_xscale("symlog", base=2)
    ax.set_xticks([0, 4, 8, 16, 32])
    ax.set_xticklabels(["0", "4", "8", "16", "32"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def kind_curves(kinds: dict, all_curves: dict, path: Path) -> Path:
    """Per feedback kind: edits only, corrections only, thumbs only, all — for each persona that ran them."""
    plt = _plt()
    n = max(len(kinds), 1)
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    for ax, (name, tracks) in zip(axes[0], kinds.items()):
        if name in all_curves:
            x, y = _xs(all_curves[name])
            ax.plot(x, y, marker="o", lw=2, label="all (mix)")
        for kind, curve in tracks.items():
            if kind == "all":
                continue
            x, y = _xs(curve)
            ax.plot(x, y, marker="s", ls="--", label=f"{kind} only")
        ax.set(xlabel="feedback events", ylabel="held-out acceptance (%)", ylim=(-3, 103), title=f"{name}: by feedback kind")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def alignment_bars(summary: dict, path: Path) -> Path:
    """Alignment quality: base vs after learning (at the target), and the degenerate share."""
    plt = _plt()
    names = list(summary["personas"])
    at = [summary["personas"][n]["curve"].get(str(summary["personas"][n]["at_events"]), 0) for n in names]
    base = [summary["personas"][n]["base"] for n in names]
    deg = [summary["personas"][n]["degenerate"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar([x - 0.27 for x in xs], [100 * b for b in base], width=0.27, label="base model")
    ax.bar(list(xs), [100 * a for a in at], width=0.27, label="after learning")
    ax.bar([x + 0.27 for x in xs], [100 * d for d in deg], width=0.27, label="degenerate (after)", color="tab:red")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names)
    ax.axhline(90, color="grey", ls="--", lw=0.8)
    ax.set(ylabel="% of held-out answers", ylim=(0, 105), title="Alignment quality on held-out prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def isolation_matrix(iso: dict, path: Path) -> Path:
    """Rows: whose adapter answered; columns: whose judge; cells: acceptance (base rate in brackets)."""
    plt = _plt()
    rows = list(iso["adapter_of"])
    cols = rows
    data = [[100 * iso["adapter_of"][r].get(c, 0) for c in cols] for r in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2, 1.0 * len(rows) + 1.6))
    ax.imshow(data, vmin=0, vmax=100, cmap="Blues")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax.text(j, i, f"{data[i][j]:.0f}\n({100 * iso['base'].get(c, 0):.0f})", ha="center", va="center", fontsize=8,
                    color="white" if data[i][j] > 60 else "black")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r}'s adapter" for r in rows])
    ax.set_title(f"Isolation @{iso['at_events']} events:\nacceptance % by judge (base %)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
