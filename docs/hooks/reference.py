"""MkDocs hook: the marker lines of the pages become tables generated from the code (distill/reference.py).

    <!-- distill:config-reference -->     every key of the config schema and the sweep's `search` section
    <!-- distill:hparams NAME -->         method NAME's hyperparameters, defaults and search distributions
    <!-- distill:method-doc NAME -->     method NAME's module docstring (its formula, sources and deviations)

A marker naming an unknown method fails the build."""
from __future__ import annotations

import re

MARKER = re.compile(r"^<!-- distill:(config-reference|hparams (\w+)|method-doc (\w+)) -->$", re.M)


def on_page_markdown(markdown, page, config, files):
    from distill import reference

    def table(match):
        if match.group(1) == "config-reference":
            return reference.config_table()
        if match.group(3):
            return reference.method_doc(match.group(3))
        return reference.hparams_table(match.group(2))

    return MARKER.sub(table, markdown)
