"""Training: a generic LightningModule, callbacks, the feature cache, and the ``train`` orchestrator."""
