"""`removebg --help` lists the subcommands without importing them: no seconds of pyarrow, SDKs and FastAPI."""

from __future__ import annotations

import subprocess
import sys

from removebg_provider.cli import SUBCOMMANDS

HEAVY = ("pyarrow", "fastapi", "cv2", "boto3", "smart_open", "removebg_provider.pipeline")


def _modules_loaded_by(argv: list[str]) -> set[str]:
    probe = (
        "import sys\n"
        "from removebg_provider.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('\\n'.join(sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return set(done.stderr.split())


def test_the_top_level_help_imports_no_subcommand_and_nothing_heavy() -> None:
    loaded = _modules_loaded_by(["--help"])

    assert {module for module, _ in SUBCOMMANDS.values()} & loaded == set()
    assert [name for name in HEAVY if name in loaded] == []
