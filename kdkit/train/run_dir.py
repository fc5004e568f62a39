"""What a run leaves behind besides checkpoints: a text log, a progress bar, and loss/accuracy curves."""
from __future__ import annotations

import time
from pathlib import Path


class RunLog:
    """Main-process-only progress and logging for one run folder."""

    def __init__(self, run_dir: Path, accelerator):
        self.run_dir = Path(run_dir)
        self.acc = accelerator
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    def progress(self, total: int, desc: str, initial: int = 0, enabled: bool = True):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0,
                    disable=not (enabled and self.acc.is_main_process))

    def line(self, text: str) -> None:
        if self.acc.is_main_process:
            with open(self.run_dir / "train.log", "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self.acc.print(text)

    def epoch(self, record: dict) -> None:
        parts = [f"epoch {record['epoch']}"]
        parts += [f"{k}={v:.4g}" for k, v in record.items() if k != "epoch" and isinstance(v, float)]
        self.line("  ".join(parts))

    def curves(self, history: list[dict]) -> Path | None:
        """curves.png: each training loss term and test accuracy per epoch."""
        if not history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [h["epoch"] for h in history]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for key in sorted(k for k in history[0] if k.startswith("train_")):
            ax1.plot(epochs, [h.get(key) for h in history], label=key.removeprefix("train_"))
        ax1.set(xlabel="epoch", ylabel="training loss (weighted terms)", yscale="log")
        ax1.legend()
        metric = "test_ppl" if any("test_ppl" in h for h in history) else "test_acc"
        acc = [(h["epoch"], h[metric]) for h in history if metric in h]
        if acc:
            ax2.plot(*zip(*acc), marker="o")
        ax2.set(xlabel="step" if metric == "test_ppl" else "epoch",
                ylabel="test perplexity" if metric == "test_ppl" else "test accuracy (%)")
        ax2.grid(alpha=0.3)
        fig.suptitle(self.run_dir.name)
        fig.tight_layout()
        path = self.run_dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
