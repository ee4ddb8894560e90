"""Training you can watch: one readable console line per epoch, ``training.csv`` in the run
folder (one row per epoch of every stage and phase) and, when the ``tensorboard`` package is
installed (``pip install "jei-dnn[tensorboard]"``), TensorBoard event files in
``<run dir>/tensorboard``.

A row is a dict: ``stage`` (``backbone`` or ``exits``), ``phase``, ``epoch``, the mean loss of
each step (``loss`` for the backbone, ``loss_<step>`` for the exits' steps), ``val_accuracy``,
``val_expected_cost`` and ``val_im_accuracy`` (a list, one per IM; CSV columns
``val_im_accuracy_<l>``), and ``seconds`` the epoch took. Nothing here imports TensorBoard
unless it is installed and wanted.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jei.errors import ConfigError
from jei.io import atomic_write

log = logging.getLogger(__name__)

CSV_NAME = "training.csv"
TENSORBOARD_DIR = "tensorboard"
FIRST_COLUMNS = ("stage", "phase", "epoch")
LAST_COLUMNS = ("seconds",)


def tensorboard_installed() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_mode(value: Any) -> bool:
    """``trainer.tensorboard``: auto (when installed), true (required) or false -> write event files?"""
    if value == "auto" and not isinstance(value, bool):
        return tensorboard_installed()
    if isinstance(value, bool):
        if value and not tensorboard_installed():
            raise ConfigError(
                'trainer.tensorboard=true, but the tensorboard package is not installed: pip install '
                '"jei-dnn[tensorboard]", or set trainer.tensorboard=auto (event files when it is installed)',
                "trainer.tensorboard",
            )
        return value
    raise ConfigError(f"trainer.tensorboard must be auto, true or false, got {value!r}", "trainer.tensorboard")


def flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row with its list values spread over numbered columns (``val_im_accuracy_0``, ...)."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, (list, tuple)):
            flat.update({f"{key}_{index}": item for index, item in enumerate(value)})
        else:
            flat[key] = value
    return flat


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def describe(row: Mapping[str, Any], epochs: int | None = None, position: tuple[int, int] | None = None) -> str:
    """The console line of one epoch, e.g.
    ``exits 2/2 alternation  epoch  3/20  loss gates 0.4012 ims 0.2231  val acc 93.40% cost 0.512  IM acc 81.2 88.0 91.3%  0.21 s``.
    """
    where = str(row.get("stage", ""))
    if position is not None:
        where += f" {position[0]}/{position[1]}"
    if row.get("phase") and row.get("phase") != row.get("stage"):
        where += f" {row['phase']}"
    width = len(str(epochs)) if epochs else 1
    text = f"{where}  epoch {int(row['epoch']) + 1:>{width}}" + (f"/{epochs}" if epochs else "")
    losses = {k: v for k, v in row.items() if k == "loss" or k.startswith("loss_")}
    shown = [(k.removeprefix("loss_") if k != "loss" else "", v) for k, v in losses.items() if v is not None]
    if shown:
        text += "  loss " + " ".join(f"{name} {value:.4f}".strip() for name, value in shown)
    text += f"  val acc {_percent(row.get('val_accuracy'))}"
    if row.get("val_expected_cost") is not None:
        text += f" cost {row['val_expected_cost']:.3f}"
    im_accuracy = row.get("val_im_accuracy")
    if im_accuracy:
        text += "  IM acc " + " ".join(f"{100 * a:.1f}" for a in im_accuracy) + "%"
    if row.get("seconds") is not None:
        text += f"  {row['seconds']:.2f} s"
    return text


class TrainingLog:
    """Rows of every epoch, written to ``training.csv`` (and TensorBoard) as they come.

    ``record(row)`` appends a line to the CSV, flushed, so ``tail -f`` shows progress; when a
    row brings a new column (another objective step's loss), or the log starts (a resumed run
    first replays the rows of its checkpoints, ``replay=True``), the whole file is rewritten
    atomically. TensorBoard gets every row not replayed; its writer opens at the first such
    row with ``purge_step`` there, so the events of an interrupted run's epochs that are run
    again are hidden. A file that cannot be written gives one warning; training goes on.
    """

    def __init__(self, folder: str | Path, tensorboard: bool = False) -> None:
        self.folder = Path(folder)
        self.path = self.folder / CSV_NAME
        self.tensorboard = bool(tensorboard)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        self._in_sync = False  # the CSV on disk holds exactly self.rows
        self._csv_failed = False
        self._writer: Any = None

    # -- CSV --
    def _ordered(self, keys: Sequence[str]) -> list[str]:
        known = list(self.columns)
        for key in keys:
            if key not in known:
                known.append(key)
        middle = [k for k in known if k not in FIRST_COLUMNS and k not in LAST_COLUMNS]
        losses = [k for k in middle if k == "loss" or k.startswith("loss_")]
        others = [k for k in middle if k not in losses]
        return [*FIRST_COLUMNS, *losses, *others, *[k for k in LAST_COLUMNS if k in known]]

    def _lines(self, rows: Sequence[Mapping[str, Any]], header: bool) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        if header:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in flatten(row).items()})
        return buffer.getvalue()

    def _write_csv(self, row: Mapping[str, Any]) -> None:
        if self._csv_failed:
            return
        columns = self._ordered(list(flatten(row)))
        try:
            if columns != self.columns or not self._in_sync:
                self.columns = columns
                text = self._lines(self.rows, header=True)
                atomic_write(self.path, lambda tmp: tmp.write_text(text))
                self._in_sync = True
            else:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(self._lines([row], header=False))
                    handle.flush()
        except OSError as err:
            self._csv_failed = True
            log.warning("training log: cannot write %s (%s); training goes on without it", self.path, err)

    # -- TensorBoard --
    def _tensorboard(self, step: int) -> Any:
        if self._writer is None and self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # installed but broken
                log.warning("training log: TensorBoard is unavailable (%s); no event files", err)
                self.tensorboard = False
                return None
            self._writer = SummaryWriter(str(self.folder / TENSORBOARD_DIR), purge_step=step)
            log.info("TensorBoard event files: %s (tensorboard --logdir %s)", self.folder / TENSORBOARD_DIR,
                     self.folder / TENSORBOARD_DIR)
        return self._writer

    def _write_tensorboard(self, row: Mapping[str, Any], step: int) -> None:
        writer = self._tensorboard(step)
        if writer is None:
            return
        stage, phase = row.get("stage", "train"), row.get("phase", "")
        for key, value in flatten(row).items():
            if key in FIRST_COLUMNS or key in LAST_COLUMNS or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            is_loss = key == "loss" or key.startswith("loss_")
            tag = f"{stage}/{phase}/{key}" if is_loss and stage != "backbone" else f"{stage}/{key}"
            writer.add_scalar(tag.replace("val_im_accuracy_", "val_im_accuracy/"), value, step)
        writer.flush()

    # -- API --
    def record(self, row: Mapping[str, Any], *, replay: bool = False) -> None:
        """Add one epoch's row; ``replay``: a row of epochs run before a resume (CSV only)."""
        row = dict(row)
        self.rows.append(row)
        self._write_csv(row)
        if not replay:
            self._write_tensorboard(row, len(self.rows) - 1)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def backbone_rows(history: Mapping[str, Sequence[float]]) -> list[dict[str, Any]]:
    """The rows of a backbone stage's history (``{"loss": [...], "val_accuracy": [...]}``)."""
    return [
        {"stage": "backbone", "phase": "backbone", "epoch": epoch, "loss": loss, "val_accuracy": accuracy}
        for epoch, (loss, accuracy) in enumerate(zip(history["loss"], history["val_accuracy"]))
    ]


def exit_rows(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of an exit stage's history (``{phase: [rows]}``, in phase order)."""
    return [{"stage": "exits", **row} for rows in history.values() for row in rows]
