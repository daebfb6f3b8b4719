"""The docs site's reference tables, generated from the code so that they cannot drift: every key of the config
schema (``config.DEFAULTS`` / ``TYPES`` / ``CHOICES``, the sweep's ``search`` section from ``tune.plan``) and every
method's hyperparameters (``Method.hparams``, ``Method.search_space``), each with the comment written beside it in
the source. ``docs/hooks/reference.py`` puts them in the pages at build time (``mkdocs build``)."""
from __future__ import annotations

import ast
import inspect
import io
import tokenize
from typing import Any


def _comments(source: str) -> dict[int, str]:
    """line number -> the comment on that line, with the comment lines that follow it (a wrapped comment)."""
    out: dict[int, str] = {}
    last = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        row, text = tok.start[0], tok.string.lstrip("#").strip()
        line = source.splitlines()[row - 1]
        if line.strip().startswith("#") and last is not None and row == last[1] + 1:
            out[last[0]] += " " + text   # the continuation of the comment above
            last = (last[0], row)
        elif not line.strip().startswith("#"):
            out[row] = text
            last = (row, row)
        else:
            last = None
    return out


def _dict_comments(source: str, node: ast.Dict, prefix: str = "") -> dict[str, str]:
    """dotted key -> its comment, for a dict literal (nested dicts recursed; an inline dict shares its line's)."""
    comments = _comments(source)
    out = {}

    def walk(d: ast.Dict, prefix: str) -> None:
        for k, v in zip(d.keys, d.values):
            if not isinstance(k, ast.Constant):
                continue
            key = f"{prefix}{k.value}"
            if isinstance(v, ast.Dict) and v.lineno != v.end_lineno:
                walk(v, key + ".")
                continue
            text = comments.get(k.lineno) or comments.get(getattr(v, "end_lineno", k.lineno), "")
            if isinstance(v, ast.Dict):
                for kk in v.keys:
                    if isinstance(kk, ast.Constant):
                        out[f"{key}.{kk.value}"] = text
            out[key] = text

    walk(node, prefix)
    return out


def _assigned_dict(source: str, name: str) -> ast.Dict | None:
    """The dict literal assigned to `name` (module level or in a class body)."""
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and isinstance(node.value, ast.Dict):
            return node.value
    return None


def _type_name(t: Any) -> str:
    types = t if isinstance(t, tuple) else (t,)
    if int in types and float in types:
        types = tuple(x for x in types if x is not int)
    names = {int: "integer", float: "number", str: "string", bool: "true/false", list: "list", dict: "mapping",
             type(None): "null"}
    return " or ".join(dict.fromkeys(names.get(x, getattr(x, "__name__", str(x))) for x in types))


def _value(v: Any) -> str:
    if v is None:
        return "`null`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    return f"`{v}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_keys() -> list[dict]:
    """Every key of the trial schema (TYPES) with its type, default, allowed values and source comment, then the
    sweep's `search` keys (tune.plan.SEARCH_DEFAULTS)."""
    from . import config
    from .tune import plan

    src = inspect.getsource(config)
    notes = _dict_comments(src, _assigned_dict(src, "DEFAULTS"))
    rows = []
    for key, t in config.TYPES.items():
        if key in ("search",):
            continue
        rows.append({"key": key, "type": _type_name(t), "default": config.get_dotted(config.DEFAULTS, key),
                     "choices": config.CHOICES.get(key), "note": notes.get(key, "")})
    psrc = inspect.getsource(plan)
    pnotes = _dict_comments(psrc, _assigned_dict(psrc, "SEARCH_DEFAULTS"), "search.")
    for key, default in _flat(plan.SEARCH_DEFAULTS, "search."):
        choices = {"search.scheduler": list(plan.SCHEDULERS), "search.sampler": list(plan.SAMPLERS)}.get(key)
        rows.append({"key": key, "type": _type_name(type(default)) if default is not None else "", "default": default,
                     "choices": choices, "note": pnotes.get(key, "")})
    return rows


def _flat(d: dict, prefix: str) -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def config_table() -> str:
    lines = ["| key | type | default | what it is |", "|---|---|---|---|"]
    for r in config_keys():
        choices = f" One of {', '.join(_value(c) for c in r['choices'])}." if r["choices"] else ""
        lines.append(f"| `{r['key']}` | {r['type']} | {_value(r['default'])} | {_cell(r['note'] + choices)} |")
    return "\n".join(lines)


def _distribution(spec: dict | None) -> str:
    if not spec:
        return "not searched by default"
    (kind, values), = spec.items()
    return f"`{kind}` {values}"


def hparam_rows(name: str) -> list[dict]:
    from .methods import get_method

    cls = get_method(name)
    src = inspect.getsource(cls)
    node = _assigned_dict(src, "hparams")
    notes = _dict_comments(src, node) if node is not None else {}
    return [{"key": k, "default": v, "search": cls.search_space.get(k), "note": notes.get(k, "")}
            for k, v in cls.hparams.items()]


def method_doc(name: str) -> str:
    """The method's module docstring (its formula, the official code it follows, its deviations) as the page's text:
    its indented formula blocks stay code blocks."""
    from .methods import get_method

    return inspect.getdoc(inspect.getmodule(get_method(name))) or ""


def hparams_table(name: str) -> str:
    rows = hparam_rows(name)
    if not rows:
        return f"`{name}` has no hyperparameters of its own (the loop's `train.*` keys apply: [configuration]" \
               f"(../configuration.md#reference))."
    lines = [f"Set as `method.<key>` (e.g. `--set method.{rows[0]['key']}=...`); searched as `method.<key>` in a "
             f"sweep's `search.space`.", "", "| key | default | search distribution (registry) | what it is |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['key']}` | {_value(r['default'])} | {_distribution(r['search'])} | {_cell(r['note'])} |")
    return "\n".join(lines)
