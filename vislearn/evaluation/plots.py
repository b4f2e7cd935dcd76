"""Training-curve pictures for the run dir."""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_history(history_csv, out_png, title=""):
    """One panel per metric, training and validation curves together."""
    rows = list(csv.DictReader(open(history_csv)))
    if not rows:
        return None
    names = [k for k in rows[0] if k != "epoch" and not k.startswith("val_") and k != "learning_rate"]
    epochs = [int(r["epoch"]) + 1 for r in rows]
    cols = min(3, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.plot(epochs, [float(r[name]) for r in rows], label="train")
        # CSVLogger writes "NA" validation columns when a run has no validation data.
        if f"val_{name}" in rows[0] and all(r[f"val_{name}"] not in ("", "NA") for r in rows):
            ax.plot(epochs, [float(r[f"val_{name}"]) for r in rows], label="validation")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend()
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)
