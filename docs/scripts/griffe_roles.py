"""A griffe extension: Sphinx roles and ``::`` literal markers in docstrings, rendered for Markdown.

The library's docstrings are Google style, but some name objects with Sphinx roles (:func:`attention_mask`,
:class:`~salt_ref.kv_cache.KVCache`) and introduce indented blocks with a trailing ``::``. Markdown would show
both literally. Before mkdocstrings renders a docstring this rewrites

- a role into an *optional* autorefs link: a link where the target is rendered on the site, plain code otherwise
  (so a reference to an object without an API entry never breaks the strict build);
- a trailing ``::`` into ``:`` (the indented block below is already a Markdown code block);

and it hides the *undocumented attributes of classes* (dataclass fields, submodules assigned in ``__init__``)
and special methods (``__str__``, ``__post_init__``): the class signature already lists the fields with their
types and defaults, so a section per field only adds length. Module-level constants (``SC_LAMBDA = 0.2``) and
undocumented methods stay.

Nothing in the source files changes. Loaded by mkdocstrings through ``extensions:`` in ``mkdocs.yml``.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj|const):`(~?)([\w.]+)(?:\(\))?`")


def _identifier(obj: griffe.Object, name: str) -> str | None:
    """Full path of ``name`` as seen from ``obj`` (dotted names are taken as they are)."""
    if "." in name:
        return name
    scope: griffe.Object | None = obj
    while scope is not None:
        try:
            return scope.resolve(name)
        except Exception:  # noqa: BLE001 - griffe raises NameResolutionError and friends; try the parent scope
            scope = scope.parent
    return None


def _rewrite(obj: griffe.Object, text: str) -> str:
    def role(match: re.Match[str]) -> str:
        tilde, name = match.groups()
        title = name.rsplit(".", 1)[-1] if tilde else name
        ident = _identifier(obj, name)
        code = f"<code>{html.escape(title)}</code>"
        if ident is None:
            return code
        return f'<autoref identifier="{html.escape(ident)}" optional>{code}</autoref>'

    text = _ROLE.sub(role, text)
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.rstrip().endswith("::") and not line.rstrip().endswith(":::"):
            stripped = line.rstrip()[:-2].rstrip()
            lines[i] = stripped + ":" if stripped else ""
    return "\n".join(lines)


def _walk(obj: griffe.Object, seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if obj.docstring is not None:
        obj.docstring.value = _rewrite(obj, obj.docstring.value)
    if obj.is_class:
        for name, member in obj.members.items():
            if member.is_alias:
                continue
            if (member.is_attribute and member.docstring is None) or (name.startswith("__") and name != "__init__"):
                member.public = False  # hidden by `filters: public`; kept for the dataclass signature
    for member in obj.members.values():
        if not member.is_alias:
            _walk(member, seen)  # type: ignore[arg-type]


class SphinxRolesToMarkdown(griffe.Extension):
    """Rewrite Sphinx roles and ``::`` markers in every docstring of a loaded package; hide bare class attributes."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _walk(pkg, set())
