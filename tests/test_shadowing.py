"""A student's own `utils.py` (or another project's `utils/` folder) beside a notebook hides the course's
package `utils`: the notebooks' setup cell names what it found instead of failing cells later."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


def _setup_check() -> str:
    """The first code cell of every notebook, up to the import it guards (plain Python: it runs as it is)."""
    cells = {}
    for path in sorted((ROOT / "notebooks").glob("0*.ipynb")):
        first = next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        cells[path.name] = "".join(first["source"])
    assert len(set(cells.values())) == 1, "the setup cell is the same in every notebook"
    code = next(iter(cells.values()))
    code = code[: code.index("import utils.setup") + len("import utils.setup")]
    return code  # the course is installed here (editable): the cell installs nothing


@pytest.mark.parametrize("shadow", ["utils.py", "utils/__init__.py"])
def test_a_students_utils_is_named_by_the_setup_cell(tmp_path, shadow):
    (tmp_path / shadow).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / shadow).write_text("def helper():\n    return 1\n")
    proc = subprocess.run([sys.executable, "-c", _setup_check()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: `import utils` found") and str(tmp_path) in last, proc.stderr
    assert "not the course's package" in last and "Rename it" in last


def test_the_course_package_passes_the_check(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _setup_check() + "\nprint(utils.COURSE)"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "clipcap-course", proc.stderr
