"""Hinton knowledge distillation from CLIP zero-shot logits: (1-a)*CE + a*T^2*KL(p_T || p_S)."""
import torch.nn.functional as F

from .base import Method, full_precision, kd_loss, teacher_logits


class KD(Method):
    name = "kd"
    hparams = {"temperature": 4.0, "kd_weight": 0.5,
               "teacher_logit_scale": "auto"}  # z_T = scale * cos(v_T, t_c); auto: the teacher's own learned scale
    search_space = {
        "temperature": {"uniform": [1.0, 8.0]},
        "kd_weight": {"uniform": [0.1, 0.9]},
    }
    needs_image_embeddings = True

    def forward(self, batch, step):
        logits = self.student(batch["x"])["logits"]
        with full_precision(logits):
            z_t = teacher_logits(batch["image_emb"], self.text("classes"), self.hp["teacher_logit_scale"])
            ce = F.cross_entropy(logits.float(), batch["y"])
            kd = kd_loss(logits, z_t, self.hp["temperature"])
            a = float(self.hp["kd_weight"])
            loss = (1 - a) * ce + a * kd
        return loss, {"ce": ce.detach(), "kd": kd.detach()}
