"""Packaging metadata: one version source, an SPDX license, typing marker, lean test extra."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re

import pytest

import mpmultifd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tomllib = pytest.importorskip("tomllib")  # 3.11+


@pytest.fixture(scope="module")
def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_one_version_source(pyproject):
    project = pyproject["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mpmultifd.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", mpmultifd.__version__)


def test_spdx_license_and_license_file(pyproject):
    project = pyproject["project"]
    assert project["license"] == "MIT"
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # not with an SPDX expression
    for name in project["license-files"]:
        with open(os.path.join(ROOT, name)) as f:
            assert "MIT License" in f.read()
    requires = pyproject["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77 for r in requires)


def test_typed_and_classified(pyproject):
    assert os.path.exists(os.path.join(ROOT, "mpmultifd", "py.typed"))
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["mpmultifd"]
    classifiers = pyproject["project"]["classifiers"]
    assert "Typing :: Typed" in classifiers
    assert {f"Programming Language :: Python :: 3.{v}" for v in (10, 11, 12, 13)} <= set(classifiers)


def test_test_extra_installs_no_tox(pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    assert not [r for r in extras["test"] if re.match(r"(tox|virtualenv)\b", r)]
    assert any(r.startswith("tox") for r in extras["dev"])


def test_changelog_names_the_version():
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert f"## {mpmultifd.__version__}" in f.read()


def test_fuzz_harnesses_stay_out_of_the_package(pyproject):
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert include and not any(fnmatch.fnmatch(name, p) for p in include for name in ("fuzz", "fuzz.harness"))
    assert os.path.exists(os.path.join(ROOT, "fuzz", "harness.py"))
    assert os.path.exists(os.path.join(ROOT, "fuzz", "fast.py"))
    for old in ("mpmultifd.fuzzing", "mpmultifd.fastfuzz"):
        assert importlib.util.find_spec(old) is None, old
