"""A generic classifier LightningModule: the network is injected (a whole FruitNet, or only its head on features)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from fruitlens.training.augment import BatchInput


class ClassifierModule(L.LightningModule):
    """Cross-entropy classifier with Adam and ReduceLROnPlateau on ``val/loss``; metrics are namespaced.

    With ``batch_input`` the loaders deliver uint8 images, turned into (augmented) model input on the device.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        batch_input: BatchInput | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        label_smoothing: float = 0.0,
        class_weights: torch.Tensor | None = None,
        plateau_patience: int = 2,
        plateau_factor: float = 0.2,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.batch_input = batch_input
        self.lr, self.weight_decay = lr, weight_decay
        self.plateau_patience, self.plateau_factor = plateau_patience, plateau_factor
        self.channels_last = channels_last
        self.loss_fn = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.batch_input is None:  # cached features: the cache holds half-precision rows
            x, *rest = batch
            return (x.float(), *rest)
        x, y = batch
        return self.batch_input(x, train=self.trainer.training, rank=self.global_rank), y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y), sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min", factor=self.plateau_factor, patience=self.plateau_patience
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss"}}
