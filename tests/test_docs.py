"""The documentation site's examples run as shown: every ```python block of docs/*.md and
docs/guide/*.md, each in a fresh namespace, except those that need a GPU (CuPy) or an MPI job
(mpi4py), which say so in their first import."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
NEEDS = ("import cupy", "from mpi4py")


def _blocks() -> list[tuple[str, int, str]]:
    if not DOCS.exists():
        return []
    found = []
    for page in sorted([*DOCS.glob("*.md"), *DOCS.glob("guide/*.md")]):
        for k, m in enumerate(re.finditer(r"```python\n(.*?)```", page.read_text(), re.S)):
            found.append((str(page.relative_to(DOCS)), k, m.group(1)))
    return found


BLOCKS = _blocks()


def test_the_site_has_examples():
    if not DOCS.exists():
        pytest.skip("docs/ is not beside the tests (installed-package run)")
    assert len(BLOCKS) >= 10


@pytest.mark.parametrize("page,k,code", BLOCKS, ids=[f"{p}#{k}" for p, k, _ in BLOCKS])
def test_example_runs(page, k, code):
    if any(n in code for n in NEEDS):
        pytest.skip(f"{page} example {k} needs a GPU or an MPI job")
    exec(compile(code, f"docs/{page} (example {k})", "exec"), {"__name__": "__docs__"})


# ---- the docstrings' Examples sections (numpydoc), run as doctests ----------------------------

_DOC_MODULES = ("functional", "phases", "variants", "masked", "layer", "distributed", "torch")


def _doctests() -> list[tuple[str, object]]:
    import doctest
    import importlib

    found = []
    for name in _DOC_MODULES:
        try:
            mod = importlib.import_module(f"bnkernel.{name}")
        except ImportError:  # bnkernel.distributed without mpi4py
            continue
        for t in doctest.DocTestFinder(exclude_empty=True).find(mod):
            if t.examples:
                found.append((t.name, t))
    return found


DOCTESTS = _doctests()


def test_the_docstrings_have_examples():
    # the main entry points show how they are called (numpydoc's Examples sections)
    names = {n.rsplit(".", 1)[-1] for n, _ in DOCTESTS}
    for f in ("batch_norm_forward", "batch_norm_backward", "BatchNorm", "channel_stats",
              "batch_renorm_forward", "ghost_batch_norm_forward", "population_stats"):  # fmt: skip
        assert f in names, f"{f}: no Examples section"


@pytest.mark.parametrize("test", [t for _, t in DOCTESTS], ids=[n for n, _ in DOCTESTS])
def test_docstring_examples(test):
    import doctest

    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    test.globs = dict(test.globs)
    result = runner.run(test, out=report.append)
    assert result.failed == 0, "".join(report)
