"""The method registry: one module per method, one line here."""
from .base import Method, MethodContext
from .erm import ERM
from .kd import KD
from .li import Li
from .rise import RISE
from .scmd import SCMD
from .vl2v import VL2V

REGISTRY: dict[str, type[Method]] = {
    "erm": ERM,
    "kd": KD,
    "rise": RISE,
    "scmd": SCMD,
    "vl2v": VL2V,
    "li": Li,
}


def get_method(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["REGISTRY", "Method", "MethodContext", "get_method"]
