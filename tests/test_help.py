"""Every entry point that takes flags answers `--help` with its usage and exit 0.

argparse formats help strings with %-formatting, so one bare `%` in a help text (e.g. "at 20%, seed 0") makes
`--help` itself fail with a format error; nothing else reads the help, so only asking for it finds that. The entry
points are found by their source (`def main(argv`), so a new script is covered as soon as it exists.
"""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"tests", "out", "models", ".git", ".venv"}


def entry_points() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if SKIP_DIRS & set(rel.parts) or "def main(argv" not in path.read_text():
            continue
        found.append(".".join(rel.with_suffix("").parts))
    return found


def test_the_scan_finds_the_entry_points():
    found = entry_points()
    for expected in ("prune", "fintune_lora", "evaluate", "bench.studies.reconstruction", "bench.studies.probe"):
        assert expected in found


@pytest.mark.parametrize("module", entry_points())
def test_help(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code in (0, None), capsys.readouterr().err
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("driver", sorted((ROOT / "bench" / "studies").glob("*_driver.py")))
def test_reference_drivers_name_their_arguments(driver):
    """The drivers run published code in its own environment, called with positional arguments; a wrong call
    gets their usage line, not a traceback."""
    run = subprocess.run([sys.executable, str(driver), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0
    assert run.stderr.startswith(f"usage: PYTHON bench/studies/{driver.name} ")
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
