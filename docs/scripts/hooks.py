"""MkDocs hooks (``hooks:`` in ``mkdocs.yml``).

Tutorial notebooks live in the repository's ``tutorials/`` folder; ``docs/tutorials`` is a symlink to it, so
mkdocs-jupyter renders them in place. The nav lists each tutorial by its file; a notebook that is not there (not
written yet, or renamed) is dropped from the nav with an INFO line instead of failing the strict build. A
tutorial listed without a label gets its notebook's first ``# `` heading as label, so the nav, the window
title and the heading on the page are the same words.

The links a reader needs to leave a page for the files behind it (rendered by
``docs/overrides/partials/actions.html``): a tutorial links its ``.ipynb`` (mkdocs-jupyter's ``include_source``
copies it next to the page), an API page links its module's source file (copied into the site under
``source/``). Both links are relative, so they work from any host and from a file copy of the site.

After the build the hook checks the built HTML: no script, stylesheet or font comes from the network (the
site must work offline: MathJax is vendored under ``docs/javascripts/mathjax/``), every tutorial page has its
notebook link and every API page its source link, and their files exist. A failure is a warning, so
``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.salt_ref")

SOURCE_DIR = "source"  # where the API pages' module files are copied in the built site
_MODULE = re.compile(r"^:::\s+([A-Za-z_][\w.]*)\s*$", re.M)
_sources: dict[str, Path] = {}  # site path (under SOURCE_DIR) -> file in the repository
_files: Any = None  # the build's Files, for the notebooks' links
# A link in a notebook's markdown, written as a path from tutorials/ in the repository (so it works on GitHub and
# in Jupyter too): ../docs/results.md, ../docs/api/kv_cache.md#anchor, or a sibling notebook 02_dmd_2d.ipynb.
_NB_LINK = re.compile(r'href="((?:\.\./docs/)?([\w./-]+\.(?:md|ipynb)))(#[^"]*)?"')


def notebook_title(path: Path) -> str | None:
    """The first ``# `` heading of a notebook's markdown cells, without emphasis or code marks (``None`` if none)."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError):
        return None
    for cell in cells:
        if cell.get("cell_type") != "markdown":
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        for line in source.splitlines():
            if line.startswith("# "):
                return re.sub(r"[*`]", "", line[2:]).strip()
    return None


def _prune(items: list[Any], docs_dir: Path) -> list[Any]:
    kept = []
    for item in items:
        if isinstance(item, str) and item.startswith("tutorials/"):
            if not (docs_dir / item).exists():
                log.info("nav: %s is not there yet; left out of the nav", item)
                continue
            title = notebook_title(docs_dir / item) if item.endswith(".ipynb") else None
            kept.append({title: item} if title else item)
            continue
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
    global _files
    _files = files
    # A dangling docs/tutorials symlink (no tutorials/ folder at all) would otherwise be copied and crash the build.
    for file in list(files):
        if not Path(file.abs_src_path).exists():
            log.info("skipping %s: it does not exist (a dangling symlink)", file.src_uri)
            files.remove(file)
    return files


def _module_file(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    root = Path(config["config_file_path"]).parent
    if page.file.src_uri.endswith(".ipynb"):
        src = Path(page.file.abs_src_path)
        rel = f"tutorials/{src.name}"
        page.meta["salt_notebook"] = {"name": src.name, "href": src.name, "repo_path": rel}
    elif page.file.src_uri.startswith("api/"):
        modules = _MODULE.findall(markdown)
        path = _module_file(modules[0], root) if modules else None
        if path is None:
            log.warning("%s: no module file found for its API entry (%s)", page.file.src_uri, modules)
        else:
            repo_path = path.relative_to(root).as_posix()
            _sources[repo_path] = path
            page.meta["salt_source"] = {"href": f"{SOURCE_DIR}/{repo_path}", "repo_path": repo_path}
    return markdown


def _notebook_links(output: str, page: Any) -> str:
    """Rewrite a notebook's links to docs pages and other notebooks (paths in the repository, which mkdocs
    does not resolve in notebooks) into the site's relative URLs; a link to no page is a warning."""
    own = Path(page.file.abs_src_path).name

    def link(match: re.Match[str]) -> str:
        href, path, anchor = match.group(1), match.group(2), match.group(3) or ""
        if href == own:  # the page's own notebook: the download link
            return match.group(0)
        src = path if href.startswith("../docs/") else f"tutorials/{path}"
        target = _files.get_file_from_path(src) if _files is not None else None
        if target is None or not target.is_documentation_page():
            log.warning("%s: the link %s goes to no page of the site", page.file.src_uri, href + anchor)
            return match.group(0)
        return f'href="{target.url_relative_to(page.file)}{anchor}"'

    return _NB_LINK.sub(link, output)


def on_post_page(output: str, page: Any, config: Any, **kwargs: Any) -> str:
    if page.file.src_uri.endswith(".ipynb"):
        output = _notebook_links(output, page)
    # mkdocs-jupyter's notebook template loads MathJax 2 from its custom_mathjax_url, empty here: drop the empty
    # <script src="">; the site's own MathJax 3 (extra_javascript) typesets the notebooks' maths.
    return output.replace('<script src=""> </script>', "")


_REMOTE = re.compile(
    r"""<script\b[^>]*\bsrc=["']?(?:https?:)?//|<link\b[^>]*\brel=["']?(?:stylesheet|preload|preconnect|modulepreload)"""
    r"""\b[^>]*\bhref=["']?(?:https?:)?//|<link\b[^>]*\bhref=["']?(?:https?:)?//[^>]*\brel=["']?(?:stylesheet|preload|"""
    r"""preconnect|modulepreload)\b|@import\s+url\(["']?(?:https?:)?//|@font-face[^}]*url\(["']?(?:https?:)?//""",
    re.I,
)


def check_site(site_dir: Path) -> list[str]:
    """Problems in a built site: resources from the network, tutorials without their notebook link, API pages
    without their source link, or links to files that are not there."""
    problems = []
    for html in sorted(site_dir.rglob("*.html")):
        rel = html.relative_to(site_dir).as_posix()
        text = html.read_text(encoding="utf-8", errors="replace")
        match = _REMOTE.search(text)
        if match:
            problems.append(f"{rel}: loads from the network: {match.group(0)[:120]}")
        if rel.startswith("tutorials/") and rel.endswith("/index.html"):
            links = re.findall(r'<a href="([^"/]+\.ipynb)" download', text)
            if not links:
                problems.append(f"{rel}: no link to its notebook")
            problems += [f"{rel}: links {x}, not in the site" for x in links if not (html.parent / x).is_file()]
        if rel.startswith("api/") and rel.endswith("/index.html"):
            links = re.findall(r'class="salt-page-links salt-source-link">.*?<a href="([^"]+)"', text, re.S)
            if not links:
                problems.append(f"{rel}: no link to its source file")
            problems += [f"{rel}: links {x}, not in the site" for x in links if not (html.parent / x).is_file()]
    return problems


def on_post_build(config: Any, **kwargs: Any) -> None:
    site_dir = Path(config["site_dir"])
    for repo_path, src in sorted(_sources.items()):
        target = site_dir / SOURCE_DIR / repo_path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    for problem in check_site(site_dir):
        log.warning("site check: %s", problem)
