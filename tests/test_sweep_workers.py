"""Two `adl sweep` processes on one study cover the grid together without running a point twice.

Storages: a journal file and SQLite (always), PostgreSQL when ADL_TEST_POSTGRES_URL is set
(`.ci/postgres.sh` installs and starts a loopback server and prints such a URL).
"""

import os
import signal
import subprocess
import sys
import time
import uuid

import optuna
import pytest

from adl.sweep.storage import open_storage
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


def test_a_worker_killed_mid_sweep_loses_no_point(tmp_path):
    """kill -9 one of two workers while it holds trials: the other re-queues them once their
    heartbeat is stale (during the sweep, not at a restart), and every point completes once."""
    cache = write_synthetic_cache(tmp_path / "cache", n=(32, 16, 16))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ADL_SWEEP_HEARTBEAT_S": "0.3", "ADL_SWEEP_GRACE_S": "3"}
    cmd = [sys.executable, "-m", "adl", "sweep", "--cache", str(cache), "--storage", url, "--study", "kill", *GRID,
           *FAST]
    victim = subprocess.Popen([*cmd, "--out", str(tmp_path / "victim")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    survivor = subprocess.Popen([*cmd, "--out", str(tmp_path / "survivor")], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    storage = open_storage(url)
    deadline = time.time() + 120
    while time.time() < deadline:  # until the victim holds trials
        try:
            trials = optuna.load_study(study_name="kill", storage=storage).get_trials()
        except KeyError:  # the study does not exist yet
            trials = []
        if any(t.state.name == "RUNNING" and t.user_attrs.get("adl_worker", "").endswith(f":{victim.pid}")
               for t in trials):
            break
        time.sleep(0.2)
    # the trials it held just before the kill: read after it, they may already be failed and
    # re-queued (the survivor, on this machine, sees the victim's OS lock free at once)
    mine = lambda t: t.user_attrs.get("adl_worker", "").endswith(f":{victim.pid}")  # noqa: E731
    held = [t.number for t in trials if t.state.name == "RUNNING" and mine(t)]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert held, "the victim was killed before it claimed a trial"
    output = survivor.communicate(timeout=300)[0]  # it finishes the sweep alone, the victim's points included
    assert survivor.returncode == 0, output
    trials = optuna.load_study(study_name="kill", storage=storage).get_trials()
    complete = sorted(t.user_attrs["adl_point"] for t in trials if t.state.name == "COMPLETE")
    assert complete == list(range(16))  # every point once
    # the victim's trials were failed (or told by the victim in the instant before the kill), not rerun in place
    assert all(mine(trials[n]) and trials[n].state.name in ("FAIL", "COMPLETE") for n in held)
    assert any(trials[n].state.name == "FAIL" for n in held)
