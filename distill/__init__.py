"""distill: distil CLIP teachers into small students that generalise to unseen domains, and sweep them with Ray."""

__version__ = "0.1.0"
