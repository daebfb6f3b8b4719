"""Evaluation of a model on named index sets: accuracy, mean cross-entropy and how its predictions spread over the
classes (``train.stop_collapsed`` reads the last), split across ranks and all-reduced."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def evaluate(model, images, labels, index_sets: dict, size: int, device, rank: int = 0, world: int = 1,
             amp=None, batch_size: int = 512, num_classes: int | None = None) -> dict[str, tuple]:
    """(accuracy, mean cross-entropy, predictions per class) of ``model.predict`` on each named index set (centre
    views), split across ranks and all-reduced."""
    from ..data.augment import IMAGENET_MEAN, IMAGENET_STD, center, normalize

    was_training = model.training
    model.eval()
    sums = torch.zeros(len(index_sets), 3, dtype=torch.float64, device=device)   # correct, loss sum, count
    num_classes = num_classes or int(labels.max()) + 1
    predicted = torch.zeros(len(index_sets), num_classes, dtype=torch.float64, device=device)
    for row, idx in enumerate(index_sets.values()):
        for chunk in idx[rank::world].split(batch_size):
            x_u8 = images[chunk.to(images.device)].to(device, non_blocking=True)   # images on the device or host
            x = normalize(center(x_u8, size), IMAGENET_MEAN, IMAGENET_STD)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            chunk = chunk.to(device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model.predict(x).float()
            y = labels[chunk]
            pred = logits.argmax(1)
            sums[row, 0] += (pred == y).sum()
            predicted[row] += torch.bincount(pred, minlength=num_classes)[:num_classes]
            sums[row, 1] += F.cross_entropy(logits, y, reduction="sum")
            sums[row, 2] += len(chunk)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
        dist.all_reduce(predicted)
    model.train(was_training)
    sums, predicted = sums.cpu(), predicted.cpu()
    return {name: ((sums[i, 0] / sums[i, 2]).item(), (sums[i, 1] / sums[i, 2]).item(), predicted[i]) if sums[i, 2]
            else (float("nan"), float("nan"), predicted[i]) for i, name in enumerate(index_sets)}
