"""Static checks of the documentation site that need no site build (a few milliseconds): the site ships its maths
renderer, uses no TeX that the vendored MathJax would have to fetch, links its notebooks' pages by paths that
exist, and the post-build checker in docs/scripts/hooks.py (run by every ``mkdocs build``) catches what it
should. The build itself, with those checks, runs in .ci/run."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MATHJAX = DOCS / "javascripts" / "mathjax"
MATHJAX_VERSION = "3.2.2"

# Macros and environments that MathJax 3.2's tex-mml-chtml.js does not contain and would autoload from
# input/tex/extensions/ (the autoload table of 3.2.2, plus \require), which the site does not ship.
AUTOLOADED = (
    "toggle mathtip texttip bbox boldsymbol bra ket braket set Bra Ket Braket Set ketbra Ketbra cancel bcancel "
    "xcancel cancelto color definecolor textcolor colorbox fcolorbox enclose xtwoheadrightarrow xtwoheadleftarrow "
    "xmapsto xlongequal xtofrom Newextarrow href class style cssId ce pu unicode verb require"
).split()
_AUTOLOADED = re.compile(r"\\(" + "|".join(AUTOLOADED) + r")(?![A-Za-z])|\\begin\{(CD|prooftree)\}")


def _hooks():
    spec = importlib.util.spec_from_file_location("salt_site_hooks", DOCS / "scripts" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notebooks() -> list[Path]:
    return sorted((ROOT / "tutorials").glob("*.ipynb"))


def _markdown_cells(path: Path) -> list[str]:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]


def test_mathjax_is_vendored_and_loaded_locally():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    block = config.split("extra_javascript:", 1)[1].split("\n\n", 1)[0]
    scripts = re.findall(r"^\s*-\s*(\S+)", block, re.M)
    assert "javascripts/mathjax/tex-mml-chtml.js" in scripts
    for script in scripts:
        assert not re.match(r"(https?:)?//", script), f"{script}: the site must not load scripts from the network"
        assert (DOCS / script).is_file(), script
    assert f'VERSION="{MATHJAX_VERSION}"' in (MATHJAX / "tex-mml-chtml.js").read_text(encoding="utf-8")
    assert "Apache License" in (MATHJAX / "LICENSE").read_text(encoding="utf-8")
    fonts = {p.name for p in (MATHJAX / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff")}
    assert {"MathJax_Main-Regular.woff", "MathJax_Math-Italic.woff", "MathJax_Size1-Regular.woff"} <= fonts
    assert len(fonts) == 23
    assert re.search(r"^\s*font:\s*false", config, re.M), "theme.font: false (no font CDN)"


def _tex_sources():
    for path in sorted(DOCS.rglob("*.md")):
        yield path, path.read_text(encoding="utf-8")
    for path in _notebooks():
        yield path, "\n".join(_markdown_cells(path))
    for folder in ("salt_ref", "toy"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path, path.read_text(encoding="utf-8")


def test_no_tex_that_mathjax_would_fetch():
    found = [
        f"{path.relative_to(ROOT)}: {m.group(0)}" for path, text in _tex_sources() for m in _AUTOLOADED.finditer(text)
    ]
    assert not found, "TeX from a MathJax extension that is not vendored (docs/javascripts/mathjax/VENDORED.txt):\n" + (
        "\n".join(found)
    )


@pytest.mark.parametrize("notebook", _notebooks(), ids=lambda p: p.name)
def test_notebook_has_a_title_and_links_that_resolve(notebook):
    assert _hooks().notebook_title(notebook), "the first '# ' heading names the page and its nav entry"
    text = "\n".join(_markdown_cells(notebook))
    for target in re.findall(r"\]\(([^)\s#]+\.(?:md|ipynb))(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        assert (notebook.parent / target).is_file(), f"{notebook.name}: link to {target}, which does not exist"
        assert target.startswith("../docs/") or "/" not in target, (
            f"{notebook.name}: link docs pages as ../docs/PAGE.md and notebooks as NAME.ipynb, not {target}"
        )


@pytest.mark.parametrize("notebook", _notebooks(), ids=lambda p: p.name)
def test_notebook_links_pages_instead_of_citing_their_paths(notebook):
    text = "\n".join(_markdown_cells(notebook))
    cited = re.findall(r"(?<!\(\.\./)\bdocs/[\w/]+\.md", text)
    assert not cited, f"{notebook.name}: link the page ([Results](../docs/results.md)), do not cite its path: {cited}"


def test_site_check_catches_what_it_should(tmp_path):
    hooks = _hooks()
    (tmp_path / "index.html").write_text('<script src="https://cdn.example/x.js"></script>')
    (tmp_path / "ok.html").write_text('<script src="javascripts/x.js"></script><a href="https://arxiv.org/">paper</a>')
    page = tmp_path / "tutorials" / "01_x"
    page.mkdir(parents=True)
    (page / "index.html").write_text('<a href="01_x.ipynb" download>01_x.ipynb</a>')
    api = tmp_path / "api" / "m"
    api.mkdir(parents=True)
    (api / "index.html").write_text("<p>no source link</p>")
    font = tmp_path / "font.html"
    font.write_text('<link rel="stylesheet" href="https://fonts.googleapis.com/css?family=Roboto">')
    problems = hooks.check_site(tmp_path)
    assert any(p.startswith("index.html: loads from the network") for p in problems)
    assert any(p.startswith("font.html: loads from the network") for p in problems)
    assert not any(p.startswith("ok.html") for p in problems)
    assert "tutorials/01_x/index.html: links 01_x.ipynb, not in the site" in problems
    assert "api/m/index.html: no link to its source file" in problems
    (page / "01_x.ipynb").write_text("{}")
    assert not any(p.startswith("tutorials/") for p in hooks.check_site(tmp_path))
