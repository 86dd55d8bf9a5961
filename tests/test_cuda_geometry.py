"""The CUDA kernels' index arithmetic (csrc/cuda/geometry.hpp), checked on the host: the header is
plain C++ for the host compiler too, so tests/cpp/cuda_geometry_test.cpp is built with it and run
here, with no GPU and no CUDA toolkit.  It checks every walk the kernels make against plain
division and that every reduction partition reads each value exactly once."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def test_geometry_against_division(tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    if not os.path.exists(os.path.join(ROOT, "csrc", "cuda", "geometry.hpp")):
        pytest.skip("the source tree is not beside the tests (installed-package run)")
    exe = tmp_path / "geometry"
    subprocess.run(
        [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-I", os.path.join(ROOT, "csrc"),
         os.path.join(ROOT, "tests", "cpp", "cuda_geometry_test.cpp"), "-o", str(exe)],
        check=True, timeout=300,
    )  # fmt: skip
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stdout + out.stderr
    assert int(out.stdout.split()[1]) > 10_000  # (the cases it checked)
