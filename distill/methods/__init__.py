"""The method registry: one module per method, one line here."""
from .base import Method, MethodContext
from .coral import CORAL
from .erm import ERM
from .groupdro import GroupDRO
from .irm import IRM
from .kd import KD
from .li import Li
from .miro import MIRO, MIROTeacher
from .mixup import Mixup
from .mmd import MMD
from .rise import RISE
from .sagnet import SagNet
from .scmd import SCMD
from .vl2v import VL2V

REGISTRY: dict[str, type[Method]] = {
    "erm": ERM,
    "kd": KD,
    "rise": RISE,
    "scmd": SCMD,
    "vl2v": VL2V,
    "li": Li,
    # DomainBed's baselines (no teacher) and MIRO
    "coral": CORAL,
    "mmd": MMD,
    "groupdro": GroupDRO,
    "irm": IRM,
    "mixup": Mixup,
    "sagnet": SagNet,
    "miro": MIRO,                # its oracle: the student's own initialisation (MIRO)
    "miro_teacher": MIROTeacher,  # its oracle: the CLIP teacher's image embedding (MIRO's CLIP experiments)
}


def get_method(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["REGISTRY", "Method", "MethodContext", "get_method"]
