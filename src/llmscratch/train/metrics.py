"""Training metrics: a CSV always, TensorBoard when installed, and the book's loss plot."""

from __future__ import annotations

import csv
from pathlib import Path

from llmscratch import runs

FIELDS = ["kind", "step", "tokens", "elapsed_s", "lr", "train_loss", "val_loss", "val_ppl", "tokens_per_s",
          "mfu"]


class MetricsLog:
    """Appends rows to the run's metrics CSV (`runs.METRICS_CSV`; one row per log or eval event) and mirrors
    them to TensorBoard.

    The columns are `FIELDS` plus any other value a stage logs (e.g. DPO's `val_reward_margin`): a new name
    adds a column, and the file is rewritten once with the wider header."""

    def __init__(self, out_dir: str | Path, resume_from_step: int | None = None, tensorboard: bool = True):
        self.path = Path(out_dir) / runs.METRICS_CSV
        rows = read_metrics(self.path) if resume_from_step is not None and self.path.exists() else []
        # A run killed after its last checkpoint logged steps that the resumed run will redo: drop them.
        rows = [r for r in rows if resume_from_step is not None and int(r["step"]) <= resume_from_step]
        self.fields = list(FIELDS) + [k for r in rows[:1] for k in r if k not in FIELDS]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None
        self._rewrite(rows)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self._tb = None

    def _rewrite(self, rows: list[dict]) -> None:
        """Write the header and `rows` to a new file that replaces the old one in one rename (a kill meanwhile
        leaves the old history whole), then append to it from there on."""
        from llmscratch.fileio import atomic_write

        if self._file is not None:
            self._file.close()

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.path, write)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=self.fields)

    def log(self, kind: str, step: int, **values) -> None:
        row = {"kind": kind, "step": step}
        row.update({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in values.items() if v is not None})
        new = [k for k in row if k not in self.fields]
        if new:  # a new metric: widen the header, keeping the rows written so far
            self._file.flush()
            rows = read_metrics(self.path)
            self.fields += new
            self._rewrite(rows)
        self._writer.writerow(row)
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and k not in ("tokens", "elapsed_s"):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def subplots(*args, **kwargs):
    """(figure, axes) as `matplotlib.pyplot.subplots(...)` makes them, but on a bare `Figure` that no pyplot
    backend manages: saving needs no display, and drawing one never switches the backend of the program that
    called (a notebook keeps its inline figures)."""
    from matplotlib.figure import Figure

    figsize = kwargs.pop("figsize", None)
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def save_figure(fig, out_png: str | Path) -> Path:
    """Lay out and write `fig` as PNG (whatever the file's suffix: a temporary name works); returns the path."""
    out_png = Path(out_png)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110, format="png")
    return out_png


def plot_losses(metrics_csv: str | Path, out_png: str | Path,
                ylabel: str = "cross-entropy loss (nats)") -> Path | None:
    """Train/val loss against steps, with tokens seen on a second x-axis (the book's figure 5.12).

    Returns None when there is nothing to plot."""
    rows = [r for r in read_metrics(metrics_csv) if r["kind"] == "eval" and r["val_loss"]]
    train_rows = [r for r in read_metrics(metrics_csv) if r["kind"] == "train" and r["train_loss"]]
    if not rows and not train_rows:
        return None
    fig, ax = subplots(figsize=(6, 4))
    if train_rows:
        ax.plot([int(r["step"]) for r in train_rows], [float(r["train_loss"]) for r in train_rows],
                label="train loss (running)", alpha=0.5)
    if rows:
        steps = [int(r["step"]) for r in rows]
        ax.plot(steps, [float(r["train_loss"]) for r in rows], "o-", label="train loss (eval)")
        ax.plot(steps, [float(r["val_loss"]) for r in rows], "s--", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    all_rows = rows + train_rows
    max_step = max(int(r["step"]) for r in all_rows)
    max_tokens = max(int(r["tokens"]) for r in all_rows)
    if max_step > 0 and max_tokens > 0:
        per_step = max_tokens / max_step
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens seen")
    return save_figure(fig, out_png)
