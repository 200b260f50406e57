"""MkDocs hooks (``hooks:`` in ``mkdocs.yml``).

Tutorial notebooks live in the repository's ``tutorials/`` folder; ``docs/tutorials`` is a symlink to it, so
mkdocs-jupyter renders them in place. The nav lists each tutorial by name; a notebook that is not there (not
written yet, or renamed) is dropped from the nav with an INFO line instead of failing the strict build.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.salt_ref")


def _prune(items: list[Any], docs_dir: Path) -> list[Any]:
    kept = []
    for item in items:
        if isinstance(item, dict):
            ((title, value),) = item.items()
            if isinstance(value, list):
                value = _prune(value, docs_dir)
                if value:
                    kept.append({title: value})
                continue
            if isinstance(value, str) and value.startswith("tutorials/") and not (docs_dir / value).exists():
                log.info("nav: %s is not there yet; left out of the nav", value)
                continue
        kept.append(item)
    return kept


def on_config(config: Any, **kwargs: Any) -> Any:
    docs_dir = Path(config["docs_dir"])
    if not (docs_dir / "tutorials").is_dir():
        log.info("docs/tutorials is missing or empty (a symlink to ../tutorials): no tutorials in this build")
    if config["nav"]:
        config["nav"] = _prune(config["nav"], docs_dir)
    return config


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    # A dangling docs/tutorials symlink (no tutorials/ folder at all) would otherwise be copied and crash the build.
    for file in list(files):
        if not Path(file.abs_src_path).exists():
            log.info("skipping %s: it does not exist (a dangling symlink)", file.src_uri)
            files.remove(file)
    return files
