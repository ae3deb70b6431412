"""Two `adl sweep` processes on one study cover the grid together without running a point twice.

Storages: a journal file and SQLite (always), PostgreSQL when ADL_TEST_POSTGRES_URL is set
(`.ci/postgres.sh` installs and starts a loopback server and prints such a URL).
"""

import os
import subprocess
import sys
import uuid

import optuna
import pytest

from adl.sweep.study import open_storage
from synthetic import write_synthetic_cache

GRID = ["--alpha", "1,2,4,8", "--k", "4,8", "--cutoff", "0,0.1"]  # 16 points
FAST = ["--head", "adalayers-pooled", "--hidden", "8", "--max-epochs", "2", "--lr", "0.01", "--batch-size", "16",
        "--group-size", "2", "--baselines", "off"]
POSTGRES = os.environ.get("ADL_TEST_POSTGRES_URL")


def storages(tmp_path):
    return {"journal": f"journal:{tmp_path / 'study.log'}", "sqlite": f"sqlite:///{tmp_path / 'study.db'}",
            "postgres": POSTGRES}


@pytest.mark.parametrize("kind", [
    "journal", "sqlite",
    pytest.param("postgres", marks=pytest.mark.skipif(
        not POSTGRES, reason="no PostgreSQL server: run .ci/postgres.sh and export ADL_TEST_POSTGRES_URL=<its URL>")),
])
def test_two_workers_share_one_study(tmp_path, kind):
    cache = write_synthetic_cache(tmp_path / "cache", n=(32, 16, 16))
    url, study = storages(tmp_path)[kind], f"workers-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "adl", "sweep", "--cache", str(cache), "--storage", url, "--study", study, *GRID,
           *FAST]
    procs = [subprocess.Popen([*cmd, "--out", str(tmp_path / f"w{i}")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    s = optuna.load_study(study_name=study, storage=open_storage(url))
    try:
        complete = [t for t in s.get_trials() if t.state.name == "COMPLETE"]
        points = sorted(t.user_attrs["adl_point"] for t in complete)
        if points != list(range(16)):
            for t in s.get_trials():
                print(t.number, t.state.name, dict(t.user_attrs, adl_result=None), t.params)
            print(outputs)
        assert points == list(range(16))  # every point once: covered, no duplicate COMPLETE point
        workers = {t.user_attrs["adl_worker"] for t in complete}
        print(f"{kind}: trials per worker", {w: sum(t.user_attrs['adl_worker'] == w for t in complete)
                                             for w in workers})
    finally:
        if kind == "postgres":
            optuna.delete_study(study_name=study, storage=open_storage(url))
