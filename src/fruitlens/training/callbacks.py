"""Callbacks: the original's 98% stop, freezing/fine-tuning as a callback, one summary line + history per epoch."""

from __future__ import annotations

import logging
import time

from pathlib import Path

from lightning.pytorch.callbacks import BaseFinetuning, Callback
from torch import nn

from fruitlens.training.history import HistoryRow, write_history

log = logging.getLogger(__name__)


class TargetAccuracy(Callback):
    """Stops training once ``monitor`` (``val/acc`` or ``train/acc``) reaches ``target``, like the original's
    callback."""

    def __init__(self, target: float, monitor: str = "val/acc") -> None:
        self.target, self.monitor = target, monitor
        self.reached_at: int | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._check(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.monitor.startswith("train"):
            self._check(trainer)

    def _check(self, trainer) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if value is not None and float(value) >= self.target and self.reached_at is None:
            self.reached_at = trainer.current_epoch
            log.info("%s reached %.4f >= target %.4f: stopping", self.monitor, float(value), self.target)
            trainer.should_stop = True


class FreezeBackbone(BaseFinetuning):
    """Freezes the backbone except its top ``train_blocks`` blocks; BatchNorm statistics stay frozen throughout.

    Works on a ``ClassifierModule`` whose ``net`` is a FruitNet. ``train_blocks=0`` trains the head only.
    """

    def __init__(self, train_blocks: int = 0) -> None:
        super().__init__()
        self.train_blocks = train_blocks

    def _frozen_and_trained(self, pl_module) -> tuple[list[nn.Module], list[nn.Module]]:
        blocks = pl_module.net.blocks()
        n = min(self.train_blocks, len(blocks))
        return (blocks[: len(blocks) - n], blocks[len(blocks) - n :]) if n else (blocks, [])

    def freeze_before_training(self, pl_module) -> None:
        self.freeze(pl_module.net.backbone, train_bn=False)
        _, trained = self._frozen_and_trained(pl_module)
        for block in trained:
            for p in block.parameters():
                p.requires_grad = True

    def finetune_function(self, pl_module, epoch: int, optimizer) -> None:
        """Nothing to unfreeze during the phase: the trained blocks are fixed up front."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # small CPU batches make BatchNorm statistics noisy: keep the pretrained ones
        for m in pl_module.net.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class EpochSummary(Callback):
    """One line per epoch on the log and a row per epoch in ``rows``, written to ``path`` (history.csv) as it
    comes, so that a run killed mid-phase keeps the history of its finished epochs for ``--resume``."""

    def __init__(self, phase: str, rows: list[dict], path: Path | None = None) -> None:
        self.phase, self.rows, self.path = phase, rows, path
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        row = HistoryRow(
            self.phase,
            trainer.current_epoch + 1,
            m.get("train/loss"),
            m.get("train/acc"),
            m.get("val/loss"),
            m.get("val/acc"),
            lr,
            round(time.perf_counter() - self._t0, 2),
        )
        self.rows.append(row)
        if self.path is not None:
            write_history(self.path, self.rows)
        _log_keras_names(trainer, row, len(self.rows))
        fmt = lambda v: "-" if v is None else f"{v:.4f}"
        log.info(
            "[%s] epoch %d: train loss %s acc %s | val loss %s acc %s | lr %.2g | %.1fs",
            self.phase,
            row.epoch,
            fmt(row.train_loss),
            fmt(row.train_acc),
            fmt(row.val_loss),
            fmt(row.val_acc),
            lr,
            row.seconds,
        )


# the original notebook's (Keras's) names for the per-epoch figures, as trackers show them
KERAS_NAMES = {
    "train_loss": "loss",
    "train_acc": "accuracy",
    "val_loss": "val_loss",
    "val_acc": "val_accuracy",
    "lr": "learning_rate",
}
PHASE_NUMBER = {"head": 1, "full": 1, "fine-tune": 2}


def _log_keras_names(trainer, row: HistoryRow, step: int) -> None:
    """loss, accuracy, val_loss, val_accuracy, learning_rate and the phase (1 head or full, 2 fine-tune) of one
    epoch to every logger of the trainer; the step counts epochs across phases, so the curves run on."""
    metrics = {name: getattr(row, key) for key, name in KERAS_NAMES.items() if getattr(row, key) is not None}
    metrics["phase"] = PHASE_NUMBER.get(row.phase, 0)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
