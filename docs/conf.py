"""Sphinx configuration: the bnkernel documentation site (``bash .ci/docs`` builds it with
warnings as errors into docs/_build/html)."""

from __future__ import annotations

import bnkernel

project = "bnkernel"
author = "the bnkernel developers"
copyright = "2026, the bnkernel developers"
version = release = bnkernel.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "demos", "**/*.json"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

autosummary_generate = True
templates_path = ["_templates"]  # autosummary/class.rst: a class page documents its methods
autodoc_typehints = "none"  # (the signatures show the defaults; the docstrings say the types)
autodoc_default_options = {"members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

html_theme = "pydata_sphinx_theme"
html_title = f"bnkernel {release}"
html_theme_options = {
    "navbar_align": "left",
    "header_links_before_dropdown": 4,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_static_path = ["_static"]
html_css_files = ["custom.css"]
