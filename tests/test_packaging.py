"""Packaging: the wheel holds ``reliability`` and ``machines`` (every subpackage and data
file of theirs) and nothing else; ``workflow-manager bench`` outside a checkout says so."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from setuptools import find_namespace_packages

import reliability._cli

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("reliability", "machines")


def _setuptools_config() -> dict[str, object]:
    config: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]  # type: ignore[index,no-any-return]


def _packages() -> set[str]:
    """What the wheel's package find selects, the way setuptools finds it (namespace
    packages included: a directory of SQL files needs no ``__init__.py``)."""
    find = _setuptools_config()["packages"]["find"]  # type: ignore[index]
    return set(find_namespace_packages(str(ROOT), include=find["include"],
                                       exclude=find.get("exclude", ())))


def _tracked(*tops: str) -> list[str]:
    listing = subprocess.run(["git", "ls-files", *tops], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    return [line for line in listing.splitlines() if line]


def test_the_wheel_holds_the_runtime_and_the_definitions_only() -> None:
    """Top-level packages are exactly reliability and machines: not benchmarks, tests or
    examples, which run from a checkout."""
    assert {name.split(".")[0] for name in _packages()} == set(SHIPPED)


def test_every_subpackage_of_the_shipped_packages_is_in_the_wheel() -> None:
    """Each directory holding tracked files under reliability/ or machines/ is a package
    the find selects, so a new subpackage (a store, a forge) cannot be left out."""
    directories = {str(Path(path).parent).replace("/", ".") for path in _tracked(*SHIPPED)}
    assert directories, "git ls-files found nothing: not a checkout?"
    assert directories <= _packages()


def test_every_data_file_of_the_shipped_packages_is_in_the_wheel() -> None:
    """A tracked file that is not a Python module (an SQL migration, a template) matches
    the package-data patterns, or the installed package would miss it."""
    patterns = _setuptools_config()["package-data"]["*"]  # type: ignore[index]
    data = [Path(p) for p in _tracked(*SHIPPED) if not p.endswith(".py")]
    missing = [str(path) for path in data if not any(path.match(p) for p in patterns)]
    assert missing == []
    sql = Path("reliability/_postgres/migrations/0001_initial.sql")
    assert any(sql.match(pattern) for pattern in patterns)


def test_bench_outside_a_checkout_says_where_the_harness_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """From an installed wheel (no benchmarks package beside reliability), ``bench`` is
    refused with one line saying to run ``python -m benchmarks`` in a checkout (exit 2)."""
    monkeypatch.setattr(reliability._cli, "__file__", str(tmp_path / "reliability" / "_cli.py"))
    monkeypatch.setitem(sys.modules, "benchmarks", None)  # as if not importable
    assert reliability._cli.main(["bench", "--quick"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "python -m benchmarks" in error and "checkout" in error


def test_bench_in_a_checkout_finds_the_harness_beside_the_package(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An editable install puts only reliability and machines on the path; ``bench`` still
    reaches the harness in the checkout the package is in (here: its usage error)."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path
                                      if Path(p or ".").resolve() != ROOT])
    for name in [n for n in sys.modules if n == "benchmarks" or n.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(SystemExit) as usage_error:
        reliability._cli.main(["bench", "compare"])
    assert usage_error.value.code == 2
    assert "workflow-manager bench compare" in capsys.readouterr().err
