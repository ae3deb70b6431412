"""The distribution: a wheel named adalayers (PyPI's `adl` is another project) holding the `adl` package,
the page `adl serve` shows and the `adl` command; every install hint in messages and docs names it."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from adl import DIST

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_builds_with_the_package_the_page_and_the_command(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the work tree
    shutil.copytree(ROOT / "adl", src / "adl", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path / "dist"
    # --no-isolation: build with this environment's setuptools instead of downloading one
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    assert wheel.name.startswith(f"{DIST}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"adl/__init__.py", "adl/cli.py", "adl/serve/server.py"} <= names
    static = {p.relative_to(ROOT).as_posix() for p in (ROOT / "adl" / "serve" / "static").iterdir()}
    assert static and static <= names
    info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(info).decode()
    assert re.search(r"^adl = adl\.cli:main$", entry_points, re.M), entry_points
    metadata = zipfile.ZipFile(wheel).read(info.replace("entry_points.txt", "METADATA")).decode()
    assert f"Name: {DIST}\n" in metadata


def test_install_hints_name_the_distribution():
    """No message or page tells users to `pip install adl` (an unrelated package) or `adl[extra]`."""
    wrong = re.compile(r"pip install[^`'\n]*\badl\b(?![-_./])|\badl\[")
    pages = [*ROOT.glob("adl/**/*.py"), ROOT / "README.md", *ROOT.glob("docs/*.md"), ROOT / "Makefile"]
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in pages for m in wrong.finditer(p.read_text())]
    assert not found, found
