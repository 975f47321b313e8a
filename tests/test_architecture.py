"""The house rule: the core never imports Airflow; only hooks and operators do."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE_MODULES = [
    "removebg_provider.client",
    "removebg_provider.ratelimit",
    "removebg_provider.manifest",
    "removebg_provider.storage",
    "removebg_provider.pipeline",
    "removebg_provider.quality",
    "removebg_provider.report",
    "removebg_provider.engines.classic",
    "removebg_provider.server.app",
    "removebg_provider.cli",
]


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_without_airflow(module: str) -> None:
    probe = f"import sys, {module}; sys.exit('airflow' in sys.modules)"

    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)

    assert done.returncode == 0, f"{module} pulled in airflow: {done.stderr}"
