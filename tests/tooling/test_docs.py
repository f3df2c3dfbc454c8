"""The documentation site (docs/): API reference completeness and page examples.

This file owns the documentation site; docs/examples/ scripts run in test_examples.py.

* every name in ``fastclip.__all__`` and ``fastclip.torch.__all__`` appears in
  an autosummary list of ``docs/api.rst`` (or is an optional name that
  ``docs/conf.py`` documents when present), and nothing listed is stale;
* every ``>>>`` example on the pages runs, with its printed output checked
  (stdlib doctest on the .rst sources, the same flags as Sphinx's doctest
  builder), and sits in a ``.. doctest::`` block so the Sphinx build runs it too;
* with Sphinx installed (the ``docs`` extra), the site builds with warnings as
  errors.  ``.ci/docs`` runs the full HTML and doctest builds.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fastclip

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = sorted(DOCS.glob("*.rst"))
FLAGS = (
    doctest.ELLIPSIS
    | doctest.NORMALIZE_WHITESPACE
    | doctest.IGNORE_EXCEPTION_DETAIL
    | doctest.DONT_ACCEPT_TRUE_FOR_1
)
HAS_SPHINX = importlib.util.find_spec("sphinx") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None


def _autosummary_names(text: str) -> set[str]:
    """Fully qualified names listed in the autosummary blocks of an .rst page."""
    names: set[str] = set()
    module = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(".. currentmodule::"):
            module = line.split("::", 1)[1].strip()
        if line.startswith(".. autosummary::"):
            i += 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("   ")):
                entry = lines[i].strip()
                if entry and not entry.startswith(":"):
                    names.add(f"{module}.{entry}" if module else entry)
                i += 1
            continue
        i += 1
    return names


def _optional_api() -> list[str]:
    """``OPTIONAL_API`` from docs/conf.py, read without importing Sphinx's config."""
    tree = ast.parse((DOCS / "conf.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "OPTIONAL_API" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    return []


def test_api_reference_lists_every_public_name():
    documented = _autosummary_names((DOCS / "api.rst").read_text())
    api_text = (DOCS / "api.rst").read_text()
    optional = {n for n in _optional_api() if hasattr(fastclip, n)}
    public = {f"fastclip.{n}" for n in fastclip.__all__ if n != "__version__"}
    missing = sorted(public - documented - {f"fastclip.{n}" for n in optional})
    assert not missing, f"public names missing from docs/api.rst: {missing}"
    assert ".. data:: __version__" in api_text
    if optional:
        assert ".. include:: _generated/optional_api.rst" in api_text


@pytest.mark.skipif(not HAS_TORCH, reason="fastclip.torch needs torch")
def test_api_reference_lists_fastclip_torch():
    import fastclip.torch as fct

    documented = _autosummary_names((DOCS / "api.rst").read_text())
    missing = sorted({f"fastclip.torch.{n}" for n in fct.__all__} - documented)
    assert not missing, f"fastclip.torch names missing from docs/api.rst: {missing}"


def test_api_reference_has_no_stale_names():
    for name in _autosummary_names((DOCS / "api.rst").read_text()):
        if name.startswith("fastclip.torch.") and not HAS_TORCH:
            continue
        module = "fastclip.torch" if name.startswith("fastclip.torch.") else "fastclip"
        obj = importlib.import_module(module)
        for part in name[len(module) + 1 :].split("."):
            assert hasattr(obj, part), f"docs/api.rst lists {name}, which does not exist"
            obj = getattr(obj, part)


def test_every_page_is_in_the_toctree():
    index = (DOCS / "index.rst").read_text()
    for page in PAGES:
        if page.stem != "index":
            assert re.search(rf"^   {re.escape(page.stem)}$", index, re.M), page.name


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_examples_are_doctest_blocks(page):
    """A ``>>>`` outside ``.. doctest::`` would be skipped by the Sphinx doctest build."""
    in_doctest = False
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith(".. "):
            in_doctest = line.startswith(".. doctest::")
        elif line and not line[0].isspace():
            in_doctest = False
        if line.lstrip().startswith(">>>"):
            assert in_doctest, f"{page.name}:{n}: example outside a '.. doctest::' block"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_page_examples_run(page):
    if "import torch" in page.read_text() and not HAS_TORCH:
        pytest.skip("this page's examples need torch")
    result = doctest.testfile(
        str(page), module_relative=False, optionflags=FLAGS, verbose=False, report=True
    )
    assert result.failed == 0, f"{result.failed} failing example(s) in {page.name}"


@pytest.mark.skipif(not HAS_SPHINX, reason="sphinx not installed (pip install -e '.[docs]')")
def test_sphinx_html_build(tmp_path):
    """The site builds with warnings as errors (in a subprocess: Sphinx's own
    deprecation warnings must not meet pytest's filterwarnings=error)."""
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    cmd += ["-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "html" / "api.html").exists()
    # formulas render offline: the pages load the MathJax copied into the site
    assert (tmp_path / "html" / "_static" / "mathjax" / "tex-chtml.js").is_file()
    page = (tmp_path / "html" / "semantics.html").read_text()
    assert "_static/mathjax/tex-chtml.js" in page
    assert not re.search(r'src="https?://[^"]*mathjax', page, re.IGNORECASE)
