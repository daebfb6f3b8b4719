"""The method registry: one module per method, one line here."""
from .base import Method, MethodContext
from .erm import ERM
from .kd import KD

REGISTRY: dict[str, type[Method]] = {
    "erm": ERM,
    "kd": KD,
}


def get_method(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["REGISTRY", "Method", "MethodContext", "get_method"]
