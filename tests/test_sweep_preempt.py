"""Preemption: kill -9 a sweep worker in the middle of a group, rerun, and get the uninterrupted
run's results bit for bit, having retrained at most one epoch; a damaged checkpoint is named and
its group restarts from scratch; two workers racing for one dead group: exactly one resumes it.

Real `python -m adl sweep` processes on a synthetic cache. The grace period is set far beyond
the tests' time bounds: a rerun on this machine must see the dead worker by its OS lock and
never wait for its heartbeat to go stale.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from adl.cache.location import Location
from adl.sweep import checkpoint
from s3server import bucket, child_env
from synthetic import write_synthetic_cache

# one shape, 8 configurations in two groups of 4 (the second not asked for yet at the kill, so
# the re-queued copies take its trial numbers); patience 1 stops some early (told at once)
GRID = ["--alpha", "1,4", "--patience", "1,20", "--cutoff", "0,0.1"]
FAST = ["--head", "adalayers-pooled", "--k", "8", "--hidden", "8", "--max-epochs", "12", "--lr", "0.003",
        "--batch-size", "8", "--group-size", "4", "--baselines", "off", "--checkpoint-every-s", "0"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200",
       "ADL_SWEEP_HEARTBEAT_S": "0.5", "ADL_SWEEP_GRACE_S": "3600"}
TIMEOUT = 300


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("preempt") / "cache", n=(600, 64, 64), strength=0.3)


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    """The uninterrupted sweep's records, by grid point."""
    out = tmp_path_factory.mktemp("reference") / "s"
    proc = subprocess.run(_cmd(cache, out), env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return _records(out)


def _cmd(cache, out, *extra):
    return [sys.executable, "-m", "adl", "sweep", "--cache", str(cache), "--out", str(out), *GRID, *FAST, *extra]


def _records(out) -> dict:
    """{grid point: its told record without wall times}; asserts every point is COMPLETE once."""
    study = _study(out)
    complete = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    points = sorted(t.user_attrs["adl_point"] for t in complete)
    assert points == list(range(8)), points  # no point missing, none duplicated
    records = {}
    for t in complete:
        rec = t.user_attrs["adl_result"]
        rec["runs"] = [{k: v for k, v in run.items() if k != "seconds"} for run in rec["runs"]]
        records[t.user_attrs["adl_point"]] = rec
    return records


def _study(out):
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")


def _checkpoints(root) -> list[str]:
    """The checkpoints under a folder or a URL (through adl's own Location, like the workers)."""
    where = Location(root)
    if where.url:
        return [f"{root}/{name}" for name in where.entries() if name.endswith(".ckpt")]
    return [str(p) for p in Path(root).glob("*.ckpt")]


def _kill_mid_group(cache, out, epoch: int = 3, extra=(), env=ENV, root=None) -> tuple[int, int]:
    """Start a worker, kill -9 it once its group's checkpoint (in ``root``, default the sweep
    folder's) holds ``epoch``; the epoch and the running configurations of the checkpoint it left."""
    root = root or out / "checkpoints"
    victim = subprocess.Popen(_cmd(cache, out, *extra), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, seen = time.time() + TIMEOUT, 0
    try:
        while time.time() < deadline and victim.poll() is None and seen < epoch:
            for location in _checkpoints(root):
                try:
                    seen = max(seen, checkpoint.read(location)["epoch"])
                except (checkpoint.CheckpointDamaged, TypeError, OSError):
                    pass  # replaced (or deleted) while read
            time.sleep(0.05)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    assert seen >= epoch, "the worker finished (or never checkpointed) before it could be killed"
    found = _checkpoints(root)
    assert len(found) == 1  # one checkpoint per running group
    payload = checkpoint.read(found[0])
    return payload["epoch"], len(payload["state"]["rows"])


def _rerun(cache, out, n: int = 1, extra=(), env=ENV) -> list[str]:
    procs = [subprocess.Popen(_cmd(cache, out, *extra), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(n)]
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, outputs
    return outputs


def _resumed(output: str) -> tuple[int, int]:
    """(configurations resumed, configurations started fresh) from a worker's last line."""
    m = re.search(r"resumed (\d+) configuration\(s\).*?, started (\d+) fresh", output, re.S)
    assert m, output
    return int(m[1]), int(m[2])


def test_kill_9_mid_group_then_rerun_resumes_bit_for_bit(cache, reference, tmp_path):
    out = tmp_path / "s"
    at, running = _kill_mid_group(cache, out)
    trials = _study(out).get_trials()
    told = sum(t.state.name == "COMPLETE" for t in trials)  # configurations that stopped early, told at once
    assert told >= 1 and all("adl_checkpoint" in t.user_attrs for t in trials)
    (output,) = _rerun(cache, out)
    assert f"from epoch {at}" in output  # at most the epoch in progress at the kill is trained again
    assert _resumed(output) == (4 - told, 4) and running >= 4 - told  # the second group had not started
    assert "waiting for" not in output  # the dead worker was seen by its lock, not after the grace period
    assert _records(out) == reference  # bit for bit
    assert not list((out / "checkpoints").glob("*"))  # deleted once the group was told


def test_a_damaged_checkpoint_is_named_and_its_group_restarts(cache, reference, tmp_path):
    out = tmp_path / "s"
    _kill_mid_group(cache, out, epoch=2)
    (path,) = (out / "checkpoints").glob("*.ckpt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    (output,) = _rerun(cache, out)
    assert f"warning: checkpoint {path} is damaged" in " ".join(output.split())
    assert "from scratch" in output
    assert _resumed(output)[0] == 0
    assert _records(out) == reference  # restarted from epoch 0, never from garbage


def test_two_workers_racing_for_one_dead_group_exactly_one_resumes_it(cache, reference, tmp_path):
    out = tmp_path / "s"
    _kill_mid_group(cache, out)
    outputs = _rerun(cache, out, n=2)
    counts = [_resumed(o) for o in outputs]
    assert sorted(c[0] > 0 for c in counts) == [False, True], outputs  # exactly one resumed the group
    assert sum(c[1] for c in counts) == 4  # the second group, never started; nothing of the first
    assert _records(out) == reference


# ---- checkpoints on an object store: a worker on another machine resumes the group ------------
BUCKET = "adl-ckpt"


@pytest.fixture(scope="module")
def s3():
    """A real S3 API on loopback (moto's server); this process and the workers use its variables."""
    with bucket(BUCKET) as (s3c, env):
        yield {"client": s3c, "env": {**child_env(env), **{k: ENV[k] for k in ("OMP_NUM_THREADS", "COLUMNS",
                                                                            "ADL_SWEEP_HEARTBEAT_S", "ADL_SWEEP_GRACE_S")}}}


def _objects(s3, prefix: str) -> list[str]:
    listed = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    return [o["Key"] for o in listed.get("Contents", [])]


def test_checkpoints_on_s3_resume_on_another_machine_bit_for_bit(cache, reference, s3, tmp_path):
    """The worker dies; a worker of "another machine" (another sweep folder and temp folder, so
    neither the first's disk nor its OS lock: it goes by heartbeats) resumes its group from the
    checkpoint object, sharing only the study and the bucket."""
    out, url = tmp_path / "s", f"s3://{BUCKET}/{tmp_path.name}/ckpt"
    at, _ = _kill_mid_group(cache, out, extra=("--checkpoints", url), env=s3["env"], root=url)
    assert not (out / "checkpoints").exists()  # nothing on the first machine's disk
    (tmp_path / "tmp2").mkdir()
    elsewhere = {**s3["env"], "TMPDIR": str(tmp_path / "tmp2"), "ADL_SWEEP_GRACE_S": "4"}
    (output,) = _rerun(cache, tmp_path / "other", extra=("--checkpoints", url, "--storage",
                                                        f"sqlite:///{out / 'study.db'}", "--study", "s"),
                       env=elsewhere)
    assert f"from epoch {at}" in output and f"checkpoint {url}/" in " ".join(output.split())
    assert _resumed(output)[0] >= 1
    assert _records(out) == reference  # bit for bit
    assert _objects(s3, f"{tmp_path.name}/ckpt") == []  # deleted once the group was told


def test_a_damaged_checkpoint_object_is_named_and_its_group_restarts(cache, reference, s3, tmp_path):
    out, prefix = tmp_path / "s", f"{tmp_path.name}/ckpt"
    url = f"s3://{BUCKET}/{prefix}"
    _kill_mid_group(cache, out, epoch=2, extra=("--checkpoints", url), env=s3["env"], root=url)
    (key,) = _objects(s3, prefix)
    body = s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=body[:-100] + bytes(100))  # its end zeroed
    (output,) = _rerun(cache, out, extra=("--checkpoints", url), env=s3["env"])
    assert f"warning: checkpoint s3://{BUCKET}/{key} is damaged (checksum mismatch" in " ".join(output.split())
    assert "from scratch" in output and _resumed(output)[0] == 0
    assert _records(out) == reference  # restarted from epoch 0, never from garbage
    assert _objects(s3, prefix) == []


# ---- the training loop's state, in process ----------------------------------------------------

@pytest.mark.parametrize("vectorise", [True, False])
def test_every_epochs_state_resumes_bit_for_bit(tmp_path, vectorise):
    """fit_all from any epoch's checkpoint (through a checkpoint file) ends exactly where the
    uninterrupted run ends: dropout on, configurations stopping early, plateaus parting the lrs."""
    import dataclasses

    import torch

    from adl.cache import open_cache
    from adl.sweep.group import fit_group
    from adl.train.config import TrainConfig, resolve, view_for
    from adl.train.data import load_data
    from adl.train.head_io import make_head
    from adl.train.trainer import Solo, fit_all

    root = write_synthetic_cache(tmp_path / "c", task="token", n=(32, 16, 16), strength=0.6)
    cache = open_cache(root)
    base = TrainConfig(cache=str(root), head="adalayers", k=8, heads=2, ff=16, hidden=8, dropout=0.1, max_epochs=5,
                       patience=3, lr_patience=0, lr=3e-3, batch_size=8, seed=1)
    points = [dict(alpha=1.0), dict(alpha=4.0, cutoff=0.2), dict(alpha=16.0, lr=1e-3), dict(alpha=2.0, patience=1)]
    cfgs = [resolve(dataclasses.replace(base, **p), cache) for p in (points if vectorise else points[:1])]
    data = load_data(cache, view_for("adalayers", cache, None), device="cpu", seed=1, memory_gb=1)

    def fit(**hooks):
        heads = []
        for c in cfgs:
            torch.manual_seed(c.seed)
            heads.append(make_head(c, data, cache.manifest))
        if vectorise:
            return fit_group(heads, data, cfgs, **hooks), heads
        return fit_all(Solo(heads[0], cfgs[0], data.train.device), data, cfgs, heads, **hooks), heads

    def same(a, b):
        rows = [{k: v for k, v in row.items() if k != "seconds"} for row in a.history]
        assert rows == [{k: v for k, v in row.items() if k != "seconds"} for row in b.history]
        assert (a.test, a.weights, a.best_epoch, a.stop_reason) == (b.test, b.weights, b.best_epoch, b.stop_reason)

    told = {}
    full, full_heads = fit(on_done=lambda r, res: told.setdefault(r, res))
    assert told == dict(enumerate(full))  # each configuration told once, as it stopped
    for epoch in range(1, max(len(r.history) for r in full)):
        path = str(tmp_path / f"{epoch}.ckpt")
        fit(checkpoint=lambda e, state: e == epoch and checkpoint.write(path, {"version": checkpoint.VERSION,
                                                                               "state": state()}))
        resumed, heads = fit(resume=checkpoint.read(path)["state"])
        for r, (a, b) in enumerate(zip(full, resumed)):
            if b is not None:  # None: finished before this epoch (told by the first run)
                same(a, b)
                for (n, x), (_, y) in zip(full_heads[r].state_dict().items(), heads[r].state_dict().items()):
                    assert torch.equal(x, y), n
