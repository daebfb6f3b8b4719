"""The built-in world (``world``: 5 shapes x 4 drawing styles, a spurious colour cue) and, drawn by the same
generator, the corpora that stand in for what pretrained models have seen (``corpus``): a captioned corpus of 25
shapes in 17 styles for fitting the built-in CLIP teacher, and a photo-style-only labelled corpus for pretraining
students. No corpus holds an image of any world.

Modules: ``shapes`` (outlines), ``draw`` (primitives), ``styles`` (the world's four styles), ``more_styles`` (13
more, for the teacher corpus), ``world`` (the world: ``generate``, ``ensure_world``), ``corpus`` (the corpora). The
world's public names (``DOMAINS``, ``CLASSES``, ``generate``, ``ensure_world``, ...) are importable from here.
"""
from .corpus import (ALL_STYLES, PALETTE, STUDENT_CORPUS, TEACHER_CORPUS, Corpus, corpus_hash, corpus_params,
                     ensure_corpus, load_corpus)
from .draw import SUPERSAMPLE
from .shapes import SHAPES, WORLD_SHAPES
from .styles import STYLES
from .world import (ATTRIBUTES, CLASSES, COLOUR_NAMES, COLOURS, CUE_PROB, DOMAINS, VERSION, caption, colour_of,
                    descriptions, draw, ensure_world, generate, render)

__all__ = [
    "ALL_STYLES", "ATTRIBUTES", "CLASSES", "COLOURS", "COLOUR_NAMES", "CUE_PROB", "Corpus", "DOMAINS", "PALETTE",
    "SHAPES", "STUDENT_CORPUS", "STYLES", "SUPERSAMPLE", "TEACHER_CORPUS", "VERSION", "WORLD_SHAPES", "caption",
    "colour_of", "corpus_hash", "corpus_params", "descriptions", "draw", "ensure_corpus", "ensure_world", "generate",
    "load_corpus", "render",
]
