"""The house rules: which parts of the package may import which.

- the core never imports Airflow, the server or the Airflow faces (hooks, operators) or the CLI;
- engines import neither the server nor the core (only the shared words);
- the shared words (`vocabulary`, `errors`) import nothing of ours;
- every module says its one job in its docstring's first line, and stays small enough to read:
  at most 700 lines, no function over 80 (tables of CLI flags and provider metadata aside).

Imports under `if TYPE_CHECKING:` are annotations only, never executed, and are not counted.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import removebg_provider

PACKAGE = Path(removebg_provider.__file__).parent
SHARED_WORDS = {"removebg_provider.vocabulary", "removebg_provider.errors"}
CORE = {
    "removebg_provider.client",
    "removebg_provider.downloads",
    "removebg_provider.guarded_fetch",
    "removebg_provider.manifest",
    "removebg_provider.outputs",
    "removebg_provider.pipeline",
    "removebg_provider.progress",
    "removebg_provider.quality",
    "removebg_provider.ratelimit",
    "removebg_provider.records",
    "removebg_provider.report",
    "removebg_provider.report_page",
    "removebg_provider.samples",
    "removebg_provider.storage",
    "removebg_provider.transport",
} | SHARED_WORDS
FACES = ("removebg_provider.hooks", "removebg_provider.operators", "removebg_provider.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _part(module: str, parts: set[str] | tuple[str, ...]) -> bool:
    return any(module == part or module.startswith(part + ".") for part in parts)


def _runtime_imports(path: Path) -> set[str]:
    """What `path` imports when it runs (`from x import y` counts x and x.y), not under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


SOURCES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
MODULES = {name: _runtime_imports(path) for name, path in SOURCES.items()}
# Functions that are tables, one entry per line: argparse flags, the provider's metadata.
TABLES = {"removebg_provider.cli.serve.add_parser", "removebg_provider.get_provider_info.get_provider_info"}
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80
ENGINES = sorted(name for name in MODULES if _part(name, ("removebg_provider.engines",)))


def _ours(imports: set[str]) -> set[str]:
    return {name for name in imports if name.startswith("removebg_provider.") or name == "removebg_provider"}


@pytest.mark.parametrize("module", sorted(name for name in MODULES if _part(name, CORE)))
def test_the_core_imports_neither_airflow_nor_the_server_nor_the_faces(module: str) -> None:
    forbidden = {
        name
        for name in MODULES[module]
        if name.split(".")[0] == "airflow" or _part(name, ("removebg_provider.server", *FACES))
    }

    assert forbidden == set()


@pytest.mark.parametrize(
    "module", sorted(name for name in MODULES if _part(name, ("removebg_provider.engines",)))
)
def test_engines_import_neither_the_server_nor_the_core(module: str) -> None:
    forbidden = {
        name
        for name in _ours(MODULES[module])
        if _part(name, ("removebg_provider.server", *(CORE - SHARED_WORDS), *FACES))
    }

    assert forbidden == set()


@pytest.mark.parametrize("module", sorted(SHARED_WORDS))
def test_shared_words_import_nothing_of_ours(module: str) -> None:
    assert _ours(MODULES[module]) == set()


@pytest.mark.parametrize(
    "module", ["removebg_provider.pipeline", "removebg_provider.report", "removebg_provider.server.app"]
)
def test_importing_the_core_or_the_server_never_loads_airflow(module: str) -> None:
    """The rules above are about direct imports; this catches one pulled in through a dependency."""
    probe = f"import sys, {module}; sys.exit('airflow' in sys.modules)"

    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)

    assert done.returncode == 0, f"{module} pulled in airflow: {done.stderr}"


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_every_module_says_its_job_in_its_first_docstring_line(module: str) -> None:
    docstring = ast.get_docstring(ast.parse(SOURCES[module].read_text())) or ""

    assert docstring.strip(), f"{module} has no docstring"


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_no_module_is_longer_than_700_lines(module: str) -> None:
    assert len(SOURCES[module].read_text().splitlines()) <= MAX_MODULE_LINES


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_no_function_is_longer_than_80_lines(module: str) -> None:
    tree = ast.parse(SOURCES[module].read_text())
    functions = (node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)))
    too_long = {
        f"{module}.{node.name}": node.end_lineno - node.lineno + 1
        for node in functions
        if node.end_lineno is not None and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }

    assert {name: lines for name, lines in too_long.items() if name not in TABLES} == {}
