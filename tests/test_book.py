"""The book and the package stay one: notebooks are committed clean and mamba2/ is what they export."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))


def test_there_are_chapters():
    assert len(NOTEBOOKS) >= 2


def test_notebooks_are_clean():
    dirty = [
        f"{nb.relative_to(ROOT)} cell {i}"
        for nb in NOTEBOOKS
        for i, c in enumerate(json.loads(nb.read_text())["cells"])
        if c["cell_type"] == "code"
        and (c.get("outputs") or c.get("execution_count") is not None)
    ]
    assert not dirty, (
        "notebooks must be committed without outputs or execution counts; clear them "
        f"(jupyter nbconvert --clear-output --inplace book/*.ipynb): {dirty}"
    )


def test_package_matches_notebooks():
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "export.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
