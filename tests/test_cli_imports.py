"""Each command imports its own machinery: loading the CLI, `adl --help` and `adl info` pull in no
torch, FastAPI, uvicorn, Optuna, matplotlib or PEFT (they cost seconds at every start otherwise)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from synthetic import write_synthetic_cache

HEAVY = ("torch", "fastapi", "uvicorn", "optuna", "matplotlib", "peft", "sklearn", "transformers")
STORE = ("numpy", "zarr", "h5py", "filelock")  # what reading a cache needs, and --help does not
ROOT = Path(__file__).resolve().parent.parent


def loaded_after(code: str, watch: tuple[str, ...] = HEAVY) -> list[str]:
    """The ``watch`` modules a fresh interpreter has loaded after running ``code``."""
    probe = f"import sys\n{code}\nimport json; print(json.dumps([m for m in {watch!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_loading_the_cli_imports_no_heavy_library():
    assert loaded_after("import adl.cli", HEAVY + STORE) == []
    help_ = "from typer.testing import CliRunner\nfrom adl.cli import app\nCliRunner().invoke(app, ['--help'])"
    assert loaded_after(help_, HEAVY + STORE) == []


def test_the_cache_packages_names_load_on_first_use():
    assert loaded_after("import adl.cache.location", STORE) == []
    assert loaded_after("from adl.cache import open_cache, SCHEMA_VERSION, write_json", ("numpy",)) == ["numpy"]


def test_help_and_info_run_without_them(tmp_path):
    cache = write_synthetic_cache(tmp_path / "c")
    run = ("from typer.testing import CliRunner\nfrom adl.cli import app\n"
           "for args in (['--help'], ['info', {cache!r}], ['info', {cache!r}, '--json'], ['train', '--help']):\n"
           "    res = CliRunner().invoke(app, args)\n"
           "    assert res.exit_code == 0, res.output\n").format(cache=str(cache))
    assert loaded_after(run) == []
