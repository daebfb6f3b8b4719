"""Datasets: registry, decoding, leave-one-domain-out splits, batched augmentation (``distill.data.augment``) and
the built-in world (``distill.data.synth``)."""
from . import augment, synth
from .images import ImageSet, UnreadableImageError, load_images
from .registry import DATASETS, DatasetError, DatasetSpec, get_spec, validate_dataset
from .splits import DomainBatches, Splits, make_splits
from .synth import ensure_world

__all__ = [
    "DATASETS", "DatasetError", "DatasetSpec", "DomainBatches", "ImageSet", "Splits", "UnreadableImageError",
    "augment", "ensure_world", "get_spec", "load_images", "make_splits", "synth", "validate_dataset",
]
