"""Pictures for people: training curves and image grids (matplotlib, headless)."""
from __future__ import annotations


def curve_figure(history: list[dict], key: str, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [h["step"] for h in history if key in h]
    vals = [h[key] for h in history if key in h]
    ax.plot(steps, vals, lw=1, alpha=0.4, label=key)
    if len(vals) >= 10:
        w = max(5, len(vals) // 20)
        smooth = [sum(vals[max(0, i - w + 1):i + 1]) / len(vals[max(0, i - w + 1):i + 1]) for i in range(len(vals))]
        ax.plot(steps, smooth, lw=2, label=f"{key} (mean of {w})")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def bar_figure(values: dict[str, float], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.bar(list(values), list(values.values()), color=["#888", "#2a7"][: len(values)] * len(values))
    for i, v in enumerate(values.values()):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def histogram_figure(counts, title: str, xlabel: str, ylabel: str):
    """One bar per bin (e.g. images per cluster), sorted by index, with the mean as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(counts)
    fig, ax = plt.subplots(figsize=(max(4, min(12, 0.25 * len(counts) + 2)), 3), dpi=100)
    ax.bar(np.arange(len(counts)), counts, color="#2a7")
    ax.axhline(counts.mean() if len(counts) else 0, color="#888", ls="--", lw=1, label="mean")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def mask_grid_figure(images: list, masks: list, gt: list | None = None, title: str = "foreground masks"):
    """Rows of (image | predicted mask overlay [| ground truth]) for a few images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(images)
    cols = 3 if gt else 2
    fig, axes = plt.subplots(n, cols, figsize=(1.8 * cols, 1.8 * n), dpi=100, squeeze=False)
    for i in range(n):
        img = np.asarray(images[i])
        overlay = img.astype(float) / 255.0
        m = np.asarray(masks[i], bool)
        overlay[m] = 0.5 * overlay[m] + 0.5 * np.array([1.0, 0.2, 0.2])
        panels = [img, overlay] + ([np.asarray(gt[i], float)] if gt else [])
        for j, p in enumerate(panels):
            axes[i, j].imshow(p, cmap="gray" if p.ndim == 2 else None)
            axes[i, j].axis("off")
    for j, name in enumerate(["image", "predicted fg"] + (["ground truth"] if gt else [])):
        axes[0, j].set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def views_grid_figure(rows: list[tuple], title: str = "GenView: original | foreground | variation"):
    """One row per example: (image, mask, variation, label) with the label (noise level, fg ratio) on the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(rows), 3, figsize=(5.4, 1.8 * len(rows)), dpi=100, squeeze=False)
    for i, (img, mask, view, label) in enumerate(rows):
        overlay = np.asarray(img, float) / 255.0
        m = np.asarray(mask, bool)
        overlay[m] = 0.5 * overlay[m] + 0.5 * np.array([1.0, 0.2, 0.2])
        for j, p in enumerate((img, overlay, view)):
            axes[i, j].imshow(p)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(label, fontsize=7)
    for j, name in enumerate(["original", "foreground", "variation"]):
        axes[0, j].set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
