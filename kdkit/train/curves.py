"""curves.png: the picture of a run's history (each training loss term, and test accuracy or perplexity)."""
from __future__ import annotations

from pathlib import Path


def plot_curves(run_dir: Path, history: list[dict]) -> Path | None:
    """curves.png in `run_dir`: each `train_*` term per record, and test accuracy (per epoch) or test
    perplexity (per step)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted(k for k in history[0] if k.startswith("train_")):
        ax1.plot(epochs, [h.get(key) for h in history], label=key.removeprefix("train_"))
    ax1.set(xlabel="epoch", ylabel="training loss (weighted terms)", yscale="log")
    ax1.legend()
    metric = "test_ppl" if any("test_ppl" in h for h in history) else "test_acc"
    points = [(h["epoch"], h[metric]) for h in history if metric in h]
    if points:
        ax2.plot(*zip(*points), marker="o")
    ax2.set(xlabel="step" if metric == "test_ppl" else "epoch",
            ylabel="test perplexity" if metric == "test_ppl" else "test accuracy (%)")
    ax2.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
