"""Sphinx configuration of the optclip documentation.

Build (offline, warnings are errors): ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# The checkout's optclip, not an installed one: the reference documents the code it sits next to.
sys.path.insert(0, str(DOCS.parent))
sys.path.insert(0, str(DOCS / "_ext"))

import optclip  # noqa: E402

project = "optclip"
author = "The optclip authors"
copyright = "The optclip authors"
release = optclip.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",
    "api_coverage",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Google-style docstrings (Args/Returns/Raises/Example), as written in optclip/*.py.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Signatures as written (``Threshold``, not the expanded union), and the argument types in the signature only.
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}
# The API page lists its autosummary tables next to the autodoc entries it links to: nothing is generated into docs/.
autosummary_generate = False

# $...$ and $$...$$ in the guides, like the docstrings' :math:.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# The check in _ext/api_coverage.py: every name in optclip.__all__ must be documented.
api_coverage_module = "optclip"

html_theme = "sphinx_book_theme"
html_title = f"optclip {release}"
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
}
# MathJax is loaded by the reader's browser; the build itself needs no network.
