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
