"""Each command imports its own machinery: loading the CLI, `adl --help` and `adl info` pull in no
torch, FastAPI, uvicorn, Optuna, matplotlib or PEFT (they cost seconds at every start otherwise),
and `adl info` reads the shards' records without numpy or a store library."""

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
    assert loaded_after(run, HEAVY + STORE) == []


# what `adl predict` must not load: training's and evaluation's libraries (seqeval.metrics imports
# scikit-learn and pandas), the server's, the sweep's, and the cache's store libraries. SciPy is not
# listed: transformers imports scipy.optimize itself when it loads a model, bare forward included.
PREDICT_NEVER = ("sklearn", "seqeval.metrics", "pandas", "fastapi", "uvicorn", "optuna", "matplotlib", "peft",
                 "zarr", "h5py", "datasets")


def test_predicting_with_a_ner_head_loads_no_evaluation_library(tmp_path):
    from tiny_backbones import bert_folder, write_conll

    from adl.extract.config import ExtractConfig
    from adl.extract.run import run_extract
    from adl.train.config import TrainConfig
    from adl.train.run import run_train

    bert, data = bert_folder(tmp_path / "bert"), write_conll(tmp_path / "d.conll")
    run_extract(ExtractConfig(model=str(bert), dataset=f"conll:{data}", out=str(tmp_path / "c"), batch_size=8,
                              progress=False))
    run_train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "ner"), head="adalayers", k=8, heads=2, ff=16,
                          max_epochs=1, device="cpu"))
    run = ("from typer.testing import CliRunner\nfrom adl.cli import app\n"
           "res = CliRunner().invoke(app, ['predict', '--run', {run!r}, '--text', 'john sat in london'])\n"
           "assert res.exit_code == 0 and 'ner' in res.output, res.output\n").format(run=str(tmp_path / "ner"))
    assert loaded_after(run, PREDICT_NEVER) == []
