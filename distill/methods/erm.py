"""ERM: cross-entropy on the student's classifier (the DomainBed baseline)."""
import torch.nn.functional as F

from .base import Method


class ERM(Method):
    name = "erm"
    hparams = {}
    search_space = {}

    def forward(self, batch, step):
        loss = F.cross_entropy(self.student(batch["x"])["logits"].float(), batch["y"])
        return loss, {"ce": loss.detach()}
