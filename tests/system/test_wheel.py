"""The wheel users install carries the example DAG and the report template, not only Python modules."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from support import REPO_ROOT


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The file names inside a wheel built from a copy of the project, offline (setuptools of the dev extra).

    A copy, because setuptools writes build/ and *.egg-info/ next to the sources it builds.
    """
    project = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO_ROOT / name, project / name)
    shutil.copytree(
        REPO_ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            ".",
        ],
        cwd=project,
        check=True,
        timeout=600,
    )
    (wheel,) = out.glob("airflow_provider_removebg-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_wheel_ships_the_example_dag(wheel_files: set[str]) -> None:
    assert "removebg_provider/example_dags/catalog_remove_background.py" in wheel_files


def test_the_wheel_ships_the_report_template(wheel_files: set[str]) -> None:
    assert "removebg_provider/templates/report.html.j2" in wheel_files
