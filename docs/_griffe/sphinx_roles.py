"""Griffe extension for the docs build: render the Sphinx roles used in docstrings.

The package's docstrings are Google style but refer to other objects with Sphinx roles
(``:func:`opis```, ``:class:`~pml_tcm.TCMRegularizer```). Markdown would show those
literally. This extension rewrites each role into an *optional* autorefs cross-reference:
a link when the target is documented on the site, plain code otherwise (never a build
warning). A reST literal-block marker ``text::`` becomes ``text:`` (the indented block
after it already renders as code in Markdown). Only the rendered text changes; the
source is untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|exc|obj|const):`(?P<target>[^`]+)`")
LITERAL_MARKER = re.compile(r"(?<=\S)::$", flags=re.MULTILINE)


def _scope(obj: griffe.Object) -> str:
    """Where a relative name in ``obj``'s docstring is looked up."""
    if obj.is_class:
        return obj.path
    if obj.parent is not None and obj.parent.is_class:
        return obj.parent.path
    return obj.module.path if not obj.is_module else obj.path


def _rewrite(text: str, scope: str) -> str:
    def replace(match: re.Match[str]) -> str:
        target = match["target"].strip()
        shorten = target.startswith("~")
        target = target.lstrip("~")
        title = target.rsplit(".", 1)[-1] if shorten else target
        if target.startswith("pml_tcm") or target.split(".")[0] in {"torch", "numpy"}:
            identifier = target
        else:
            identifier = f"{scope}.{target}"
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    return LITERAL_MARKER.sub(":", ROLE.sub(replace, text))


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring into optional cross-references."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj.docstring.value, _scope(obj))
