"""Prompt templates as data, and their expansion into one list of prompts per class (ensembled by the teacher).

A template holds ``{c}`` (class name) and optionally ``{d}`` (a domain name: expanded over the domain names given;
in a trial those are the SOURCE domains only: the held-out domain is unknown to training, its name included).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

ENSEMBLES = ("normalized", "raw")
# Li et al.'s described prompt, as their code writes it (main_experiments.py: f"a photo of {c} . {description}")
DESCRIBED_TEMPLATE = "a photo of {c} . {description}"


@dataclass(frozen=True)
class PromptSet:
    """Rows of prompts (one row per class, or per anchor) and how a row's prompts are ensembled into one embedding:
    ``normalized`` (CLIP's usual: the mean of the L2-normalised prompt embeddings, renormalised) or ``raw`` (RISE's
    code: the mean of the raw embeddings, then normalised)."""

    rows: tuple
    ensemble: str = "normalized"

    def __post_init__(self):
        if self.ensemble not in ENSEMBLES:
            raise PromptError(f"prompt ensemble {self.ensemble!r} is not one of {ENSEMBLES}")
        object.__setattr__(self, "rows", tuple(tuple(r) for r in self.rows))

    def lists(self) -> list[list[str]]:
        return [list(r) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return list(self.rows[i]) if isinstance(i, int) else [list(r) for r in self.rows[i]]

    def __iter__(self):
        return iter(self.lists())


def as_prompt_set(value) -> PromptSet:
    """A PromptSet, or rows (a list of lists of prompts) meaning the normalized ensemble."""
    return value if isinstance(value, PromptSet) else PromptSet(value)

TEMPLATES: dict[str, list[str]] = {
    "single": ["a photo of a {c}."],
    # RISE (ICCV'23): the 7-template ensemble of their official code
    "rise": [
        "itap of a {c}.",
        "a bad photo of the {c}.",
        "a origami {c}.",
        "a photo of the large {c}.",
        "a {c} in a video game.",
        "art of the {c}.",
        "a photo of the small {c}.",
    ],
    "scmd": ["this is a photo of a {c}"],    # SCMD (TMLR'24)
    "li": ["a photo of {c}"],                # Li et al. (ICCV'23)
    # a subset of CLIP's 80-template ImageNet ensemble
    "openai": [
        "a bad photo of a {c}.",
        "a photo of many {c}.",
        "a sculpture of a {c}.",
        "a photo of the hard to see {c}.",
        "a low resolution photo of the {c}.",
        "a rendering of a {c}.",
        "graffiti of a {c}.",
        "a bad photo of the {c}.",
        "a cropped photo of the {c}.",
        "a tattoo of a {c}.",
        "a bright photo of a {c}.",
        "a photo of a clean {c}.",
        "a photo of a dirty {c}.",
        "a dark photo of the {c}.",
        "a drawing of a {c}.",
        "a photo of my {c}.",
        "a painting of the {c}.",
        "a sketch of a {c}.",
        "a cartoon {c}.",
        "itap of a {c}.",
    ],
    "domain": ["a {d} of a {c}."],           # expanded over the dataset's domain names (RISE's anchors)
}


class PromptError(ValueError):
    """A template set or template that cannot be expanded."""


def resolve_templates(templates: str | Sequence[str]) -> list[str]:
    """A set name, or a list of set names and/or literal templates -> the flat list of templates."""
    items = [templates] if isinstance(templates, str) else list(templates)
    if not items:
        raise PromptError("empty template list")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise PromptError(f"template {item!r}: expected a string")
        if item in TEMPLATES:
            out.extend(TEMPLATES[item])
        elif "{c}" in item:
            out.append(item)
        else:
            raise PromptError(f"template {item!r} is neither a known set ({', '.join(TEMPLATES)}) "
                              f"nor a template containing {{c}}")
    return out


def validate_templates(templates) -> list[str]:
    """Problems with a config's templates value (empty when usable)."""
    try:
        resolve_templates(templates)
    except PromptError as e:
        return [str(e)]
    return []


def class_prompts(class_names, templates: str | Sequence[str] = "single",
                  domain_names: Sequence[str] | None = None) -> list[list[str]]:
    """One list of prompts per class. ``class_names`` may also be a ``DatasetSpec`` (its class and domain names)."""
    if hasattr(class_names, "class_names"):
        spec = class_names
        class_names = spec.class_names
        domain_names = domain_names if domain_names is not None else spec.domain_names
    flat = resolve_templates(templates)
    if any("{d}" in t for t in flat) and not domain_names:
        raise PromptError("a template uses {d} but no domain names were given")
    rows = []
    for c in class_names:
        row: list[str] = []
        for t in flat:
            if "{d}" in t:
                row.extend(t.format(c=c, d=d) for d in domain_names)
            else:
                row.append(t.format(c=c))
        rows.append(row)
    return rows


def describe_prompts(class_names, descriptions: Mapping[str, str] | Sequence[str],
                     keys: Sequence[str] | None = None) -> list[list[str]]:
    """Li et al.'s described prompts: ``"a photo of {c} . {description}"``, one single-prompt row per class.

    ``descriptions`` is a list aligned with the classes, or a mapping looked up by ``keys`` (default: the class
    names; pass the class folder names for ``DatasetSpec.descriptions``). A ``DatasetSpec`` may be passed as
    ``class_names``, with ``descriptions=None`` meaning its own."""
    if hasattr(class_names, "class_names"):
        spec = class_names
        class_names = spec.class_names
        keys = keys if keys is not None else spec.classes
        descriptions = descriptions if descriptions is not None else spec.descriptions
    if descriptions is None:
        raise PromptError("no class descriptions available")
    if isinstance(descriptions, Mapping):
        keys = list(keys if keys is not None else class_names)
        missing = [k for k in keys if k not in descriptions]
        if missing:
            raise PromptError(f"no description for class(es) {', '.join(missing)}")
        texts = [descriptions[k] for k in keys]
    else:
        texts = list(descriptions)
        if len(texts) != len(class_names):
            raise PromptError(f"{len(texts)} descriptions for {len(class_names)} classes")
    return [[DESCRIBED_TEMPLATE.format(c=c, description=d).strip()] for c, d in zip(class_names, texts)]
