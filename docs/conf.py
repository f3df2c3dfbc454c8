"""Sphinx configuration for the fastclip documentation.

Build (warnings are errors) and run every example on the pages::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python -m sphinx -W --keep-going -b doctest docs docs/_build/doctest
"""

from __future__ import annotations

import doctest
import warnings
from pathlib import Path

import fastclip

DOCS = Path(__file__).resolve().parent

project = "fastclip"
author = "fastclip developers"
copyright = "fastclip developers"  # noqa: A001 (Sphinx's name)
release = fastclip.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    # MathJax 3 shipped with the site (copied into _static/mathjax), so formulas
    # render offline; Sphinx's default loads it from a CDN.
    "sphinx-mathjax-offline",
    "numpydoc",
]
mathjax_path = "mathjax/tex-chtml.js"

exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_static_path = ["_static"]
html_theme = "pydata_sphinx_theme"
html_title = f"fastclip {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_sidebars = {"**": ["sidebar-nav-bs"]}
html_show_sourcelink = False

# -- API reference: autosummary stubs from the docstrings (numpydoc format).
autosummary_generate = True
autodoc_typehints = "none"  # the numpydoc Parameters sections carry the types
numpydoc_show_class_members = False  # members are listed by autosummary instead
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# AGC's docstring has a "Returns (from a call)" section, which numpydoc does not
# know (a UserWarning, not a Sphinx warning); its text still renders.
warnings.filterwarnings("ignore", message="Unknown section Returns", category=UserWarning)

# -- Examples: pages use ``.. doctest::`` blocks; the ``>>>`` examples inside the
# docstrings are run by pytest --doctest-modules (with pytest's NUMBER flag), so
# the doctest builder leaves plain doctest blocks (the docstrings') alone.
doctest_test_doctest_blocks = ""
doctest_default_flags = (
    doctest.ELLIPSIS
    | doctest.NORMALIZE_WHITESPACE
    | doctest.IGNORE_EXCEPTION_DETAIL
    | doctest.DONT_ACCEPT_TRUE_FOR_1
)

# -- Names that exist only once a later issue lands (issue 6: per-sample clipping).
# If fastclip exports them, the reference documents them and the recipe says so;
# otherwise the pages say they are planned.  tests/tooling/test_docs.py reads this list.
OPTIONAL_API = ["clip_per_sample", "PerSampleClipResult"]
PRESENT_OPTIONAL = [name for name in OPTIONAL_API if hasattr(fastclip, name)]
if "clip_per_sample" in PRESENT_OPTIONAL:
    tags.add("per_sample")  # type: ignore[name-defined]  # noqa: F821 (Sphinx injects tags)


def _write_optional_api() -> None:
    """docs/_generated/optional_api.rst, included by api.rst (regenerated every build)."""
    out = DOCS / "_generated"
    out.mkdir(exist_ok=True)
    lines = []
    if PRESENT_OPTIONAL:
        lines += ["Per-sample clipping (DP-SGD)", "----------------------------", ""]
        for name in PRESENT_OPTIONAL:
            kind = "autoclass" if isinstance(getattr(fastclip, name), type) else "autofunction"
            lines += [f".. {kind}:: fastclip.{name}", ""]
    text = "\n".join(lines) + "\n"
    target = out / "optional_api.rst"
    if not target.exists() or target.read_text() != text:
        target.write_text(text)


_write_optional_api()
