"""A trial's model as a plain PyTorch module for MLflow: ``mlflow.pytorch.load_model('models:/<sweep>-<domain>/<v>')``
returns a module that maps a batch of normalised images [B, 3, H, W] to class logits [B, C] (the method's own
``predict``: a text head, a zero-shot head, or the student's classifier), with its input size and normalisation in
the logged signature and metadata. Loading it needs the ``distill`` package installed (the module is pickled)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data.augment import IMAGENET_MEAN, IMAGENET_STD


class Predictor(nn.Module):
    """Normalised images [B, 3, image_size, image_size] (ImageNet mean/std) -> class logits [B, len(classes)]."""

    def __init__(self, method: nn.Module, image_size: int, classes: list[str]):
        super().__init__()
        self.method = method.eval()
        self.image_size = int(image_size)
        self.classes = list(classes)
        self.mean, self.std = tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.predict(x.float())


def predictor(cfg: dict, model_state: dict) -> Predictor:
    """The trial's method rebuilt in the driver (the same caches the workers read) with a checkpoint's weights."""
    from ..methods import get_method
    from ..models.students import build_student
    from .prepare import load_task, method_context, method_hparams, prepare, teacher_outputs

    assets = prepare(cfg)
    spec, images, splits = load_task(cfg)
    ctx = method_context(cfg, spec, splits, assets["embed_dim"])
    outputs = teacher_outputs(cfg, images, ctx, assets["teacher"], teacher_id=assets["teacher_id"])
    student = build_student(cfg["student"]["backbone"], "none", cfg["student"]["freeze_bn"],
                            embed_dim=assets["embed_dim"], num_classes=len(spec.classes))
    method = get_method(cfg["method"]["name"])(student, method_hparams(cfg, assets.get("teacher_logit_scale")),
                                               ctx, outputs.text)
    method.load_state_dict(model_state)
    return Predictor(method, cfg["dataset"]["image_size"], list(spec.class_names))


def log_predictor(uri: str, run_id: str, model: Predictor, registered_name: str | None = None):
    """mlflow.pytorch.log_model into the trial's run, with a signature, an input example and the preprocessing in
    the metadata; registered as a version of `registered_name` when given. Returns MLflow's ModelInfo."""
    import mlflow
    from mlflow.models import infer_signature

    example = np.random.default_rng(0).standard_normal((2, 3, model.image_size, model.image_size)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        return mlflow.pytorch.log_model(
            model, name="model", signature=infer_signature(example, logits), input_example=example,
            registered_model_name=registered_name, await_registration_for=60,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "distill"],
            metadata={"input": f"float32 [B, 3, {model.image_size}, {model.image_size}], RGB in [0, 1] normalised "
                               f"with mean {list(model.mean)} and std {list(model.std)}",
                      "output": f"class logits [B, {len(model.classes)}]", "classes": model.classes})
