"""Caches on an object store: every test talks to a real S3 HTTP API on loopback (moto's server).

extract -> info -> train -> sweep -> predict on s3://; kill -9 then rerun is bit-identical and
never rewrites part of an object; two writers racing to publish: one manifest; --overwrite
never deletes a user's object; wrong credentials, a missing bucket, a refused endpoint and
HDF5 on a URL are one line each; a store failing a share of requests is retried, or stops with
one line and no manifest.
"""

import json
import random
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from adl.cache import open_cache, shard_name, verify_cache
from adl.cache.backends import ZarrBackend, open_backend
from adl.cache.location import Location
from adl.cli import app
from adl.errors import AdlError
from adl.extract.config import ExtractConfig
from adl.extract.run import run_extract
from s3server import SECRET, bucket, child_env, set_auth
from tiny_backbones import bert_folder, write_csv

BUCKET = "adl-test"
runner = CliRunner()
FAST = ["--k", "4", "--heads", "2", "--ff", "8", "--max-epochs", "2"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with bucket(BUCKET, versioning=True) as (s3c, env):
        root = tmp_path_factory.mktemp("s3")
        yield {"env": env, "client": s3c, "bert": str(bert_folder(root / "bert")),
               "csv": f"csv:{write_csv(root / 'd.csv', n=80)}"}


def config(s3, out: str, **kw) -> ExtractConfig:
    return ExtractConfig(**{"model": s3["bert"], "dataset": s3["csv"], "views": ["pooled", "tokens"], "batch_size": 4,
                            "progress": False, "out": out, **kw})


def keys(s3, prefix: str) -> dict[str, int]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:]: o["Size"] for p in pages for o in p.get("Contents", [])}


def stored(url: str) -> dict:
    store = open_backend(f"{url}/{shard_name(0, 1)}.zarr", "zarr", "r")
    return {k: np.asarray(store.array(k)[:]) for split in ("train", "validation", "test")
            for k in (f"{split}/{n}" for n in ("ids", "offsets", "labels", "pooled_mean", "tokens")) if store.has(k)}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture(scope="module")
def whole(s3):
    """One uninterrupted extraction to S3: the reference."""
    run_extract(config(s3, f"s3://{BUCKET}/whole"))
    return f"s3://{BUCKET}/whole"


def invoke(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def test_extract_info_train_sweep_predict_on_s3(s3, whole, tmp_path):
    res = invoke("info", whole, "--check")
    assert "verified" in res.output
    manifest = json.loads(invoke("info", whole, "--json").output)
    assert manifest["format"] == "zarr" and SECRET not in json.dumps(manifest)
    assert not any(SECRET in s3["client"].get_object(Bucket=BUCKET, Key=f"whole/{k}")["Body"].read().decode()
                   for k in keys(s3, "whole") if k.endswith(".json"))
    invoke("train", "--cache", whole, *FAST, "--out", tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").is_file()
    invoke("train", "--cache", whole, *FAST, "--out", tmp_path / "streamed", "--memory-gb", "0.00001")
    assert (tmp_path / "streamed" / "metrics.json").is_file()
    invoke("train", "--cache", whole, "--head", "adalayers-pooled", "--hidden", "8", "--max-epochs", "2",
           "--out", tmp_path / "pooled")
    invoke("sweep", "--cache", whole, "--alpha", "1,8", "--baselines", "off", *FAST[:6], "--max-epochs", "1",
           "--out", tmp_path / "sweep")
    assert (tmp_path / "sweep" / "sweep.json").is_file()
    res = invoke("predict", "--run", tmp_path / "run", "--text", "a good movie", "--out", tmp_path / "p.jsonl")
    assert json.loads((tmp_path / "p.jsonl").read_text().splitlines()[0])


CRASH = """
import json, os, signal, sys
from adl.cache.writer import ShardWriter
original, calls = ShardWriter.commit, [0]
def commit(self, split, n):
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):  # chunks written, this batch not committed
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, split, n)
ShardWriter.commit = commit
from adl.extract.config import ExtractConfig
from adl.extract.run import run_extract
run_extract(ExtractConfig(**json.loads(sys.argv[1])))
"""


@pytest.mark.parametrize("kill_at", [7, 15])
def test_kill_9_during_an_s3_extraction_then_rerun_is_bit_identical(s3, whole, tmp_path, kill_at, monkeypatch):
    url = f"s3://{BUCKET}/crashed-{kill_at}"
    cfg = config(s3, url)
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    proc = subprocess.run([sys.executable, str(script), json.dumps(cfg.to_dict()), str(kill_at)],
                          env=child_env(s3["env"]), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    left = keys(s3, f"crashed-{kill_at}")
    assert "manifest.json" not in left and f"{shard_name(0, 1)}.progress.json" in left
    with pytest.raises(AdlError, match="not a complete adl cache"):
        open_cache(url)
    writes, original = [], ZarrBackend.write

    def record(self, name, start, data):  # every write of the rerun covers whole chunks
        writes.append((name, start, len(data), self.chunk_rows(name), self.array(name).shape[0]))
        original(self, name, start, data)

    monkeypatch.setattr(ZarrBackend, "write", record)
    run_extract(cfg)  # the same command again
    for name, start, n, step, total in writes:
        assert start % step == 0 and ((start + n) % step == 0 or start + n == total), (name, start, n, step)
    assert_identical(stored(whole), stored(url))
    done = f"{shard_name(0, 1)}.done.json"
    assert Location(url).read_json(done)["arrays"] == Location(whole).read_json(done)["arrays"]
    assert verify_cache(url) == []


RACE = """
import json, os, sys, time
import adl.extract.run as run
original, gate = run.publish, sys.argv[2]
def publish(root, num_shards, fields):  # both shards are done: both try to publish together
    open(os.path.join(gate, str(os.getpid())), "w").close()
    deadline = time.time() + 300
    while len(os.listdir(gate)) < 2 and time.time() < deadline:
        time.sleep(0.02)
    return original(root, num_shards, fields)
run.publish = publish
from adl.cli import main
sys.argv = ["adl", *json.loads(sys.argv[1])]
main()
"""


def test_two_writers_racing_to_publish_one_cache_make_one_manifest(s3, tmp_path):
    script, gate = tmp_path / "race.py", tmp_path / "gate"
    script.write_text(RACE)
    gate.mkdir()
    args = ["extract", "--model", s3["bert"], "--dataset", s3["csv"], "--views", "pooled,tokens", "--batch-size", "4",
            "--out", f"s3://{BUCKET}/race", "--num-shards", "2", "--shard-index"]
    procs = [subprocess.Popen([sys.executable, str(script), json.dumps([*args, str(i)]), str(gate)],
                              env=child_env(s3["env"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outs]
    said = [o + e for o, e in outs]
    assert sum("cache complete" in s for s in said) == 1
    assert sum("another writer published the manifest first" in s for s in said) == 1
    versions = s3["client"].list_object_versions(Bucket=BUCKET, Prefix="race/manifest.json")["Versions"]
    assert len(versions) == 1
    assert verify_cache(f"s3://{BUCKET}/race") == []


def test_a_second_process_on_one_shard_is_told(s3, tmp_path):
    """Two processes start one shard at once (no lock on a store): the claim by conditional PUT
    of its progress object lets one create the store; the other is told, and wipes nothing."""
    from adl.cache import ShardWriter, SplitLayout

    url = f"s3://{BUCKET}/claimed"
    lay = {"train": SplitLayout(ids=np.arange(4), offsets=np.arange(5), labels=np.zeros(4, np.int64))}
    arrays = {"pooled_mean": ((2, 3), 2)}
    first, second = ShardWriter(url, "zarr"), ShardWriter(url, "zarr")
    # the second looked before the first had claimed the shard
    second.root.exists = lambda name: name != second.progress_name and Location.exists(second.root, name)
    first.create(lay, arrays, "float16", 4)
    first.write("train", "pooled_mean", 0, np.ones((4, 2, 3), np.float16))
    with pytest.raises(AdlError, match="another process has just started writing .*one process per shard"):
        second.create(lay, arrays, "float16", 4)
    assert np.asarray(first.store.array("train/pooled_mean")[:]).sum() == 24  # nothing wiped


def test_overwrite_never_deletes_a_users_object(s3, whole):
    s3["client"].put_object(Bucket=BUCKET, Key="mixed/notes.txt", Body=b"mine")
    s3["client"].put_object(Bucket=BUCKET, Key="mixed-other/x.bin", Body=b"a neighbour prefix")
    with pytest.raises(AdlError, match=r"holds entries that are not an adl cache \(notes.txt\)"):
        run_extract(config(s3, f"s3://{BUCKET}/mixed", overwrite=True))
    assert set(keys(s3, "mixed")) == {"notes.txt"}
    s3["client"].put_object(Bucket=BUCKET, Key="whole/shard-00000-of-00001.zarr.bak", Body=b"mine too")
    try:
        with pytest.raises(AdlError, match="not an adl cache"):
            run_extract(config(s3, whole, overwrite=True, dtype="float32"))
        assert "manifest.json" in keys(s3, "whole")
    finally:
        s3["client"].delete_object(Bucket=BUCKET, Key="whole/shard-00000-of-00001.zarr.bak")
    # a prefix holding only adl's objects is replaced by --overwrite
    url = f"s3://{BUCKET}/replaced"
    run_extract(config(s3, url, views=["pooled"]))
    with pytest.raises(AdlError, match="already holds another extraction"):
        run_extract(config(s3, url))
    run_extract(config(s3, url, overwrite=True))
    assert open_cache(url).views == ["pooled:mean", "tokens"]


def one_line(s3, args, **env):
    proc = subprocess.run([sys.executable, "-m", "adl", *args], env={**child_env(s3["env"]), **env},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert SECRET not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    return lines[0]


def test_wrong_credentials_missing_bucket_refused_endpoint_are_one_line(s3, whole):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert "bucket of s3://no-such-bucket/c does not exist" in one_line(s3, ["info", "s3://no-such-bucket/c"])
    line = one_line(s3, ["info", f"s3://{BUCKET}/whole"], AWS_ENDPOINT_URL=f"http://127.0.0.1:{closed}")
    assert f"cannot reach the object store of s3://{BUCKET}/whole at http://127.0.0.1:{closed}" in line
    line = one_line(s3, ["extract", "--model", s3["bert"], "--dataset", s3["csv"], "--format", "hdf5",
                         "--out", f"s3://{BUCKET}/h5"])
    assert "HDF5 cannot live on an object store" in line and "--format zarr" in line
    set_auth(s3["env"], enforce=True)
    try:
        line = one_line(s3, ["info", f"s3://{BUCKET}/whole"], AWS_SECRET_ACCESS_KEY=SECRET + "-wrong")
    finally:
        set_auth(s3["env"], enforce=False)
    assert f"access denied to s3://{BUCKET}/whole" in line


def test_secrets_in_a_url_are_masked(s3):
    res = runner.invoke(app, ["info", f"s3://user:{SECRET}@{BUCKET}/nothing?token={SECRET}"])
    assert res.exit_code == 2 and SECRET not in res.output


class Flaky:
    """An S3 filesystem that fails a share of its object writes (a test wrapper, "flaky://")."""

    share, calls, failed = 0.0, 0, 0
    lock = threading.Lock()
    rng = random.Random(0)


def flaky_fs():
    from s3fs import S3FileSystem

    class FlakyS3(S3FileSystem):
        protocol = ("flaky",)

        async def _pipe_file(self, path, data, *args, **kwargs):
            with Flaky.lock:
                Flaky.calls += 1
                fail = Flaky.rng.random() < Flaky.share
                Flaky.failed += fail
            if fail:
                raise OSError("injected failure: 503 Slow Down")
            return await super()._pipe_file(path, data, *args, **kwargs)

    return FlakyS3


@pytest.fixture
def flaky(s3, monkeypatch):
    import fsspec

    fsspec.register_implementation("flaky", flaky_fs(), clobber=True)
    Flaky.share, Flaky.calls, Flaky.failed = 0.0, 0, 0
    yield Flaky
    Flaky.share = 0.0


def test_a_store_failing_a_share_of_writes_is_retried(s3, whole, flaky):
    flaky.share = 0.25
    run_extract(config(s3, f"flaky://{BUCKET}/flaky"))
    assert flaky.failed > 5
    assert_identical(stored(whole), stored(f"s3://{BUCKET}/flaky"))
    assert verify_cache(f"s3://{BUCKET}/flaky") == []


def test_a_store_that_keeps_failing_stops_with_one_line_and_no_manifest(s3, whole, flaky, monkeypatch):
    monkeypatch.setenv("ADL_STORAGE_ATTEMPTS", "3")
    url = f"flaky://{BUCKET}/down"
    original = ZarrBackend.write

    def write(self, name, start, data):  # the store goes down once the first tokens are stored
        original(self, name, start, data)
        if name.endswith("tokens"):
            flaky.share = 1.0

    monkeypatch.setattr(ZarrBackend, "write", write)
    with pytest.raises(AdlError, match=r"the object store kept failing on .* \(3 attempts.*rerun the same command"):
        run_extract(config(s3, url))
    assert "manifest.json" not in keys(s3, "down")
    monkeypatch.setattr(ZarrBackend, "write", original)
    flaky.share = 0.0
    run_extract(config(s3, url))  # the store is back: the rerun resumes and publishes
    assert_identical(stored(whole), stored(f"s3://{BUCKET}/down"))


def test_check_names_a_missing_and_a_changed_chunk_on_s3(s3, whole):
    for key in keys(s3, "whole"):
        s3["client"].copy_object(Bucket=BUCKET, Key=f"damaged/{key}", CopySource={"Bucket": BUCKET, "Key": f"whole/{key}"})
    url, store = f"s3://{BUCKET}/damaged", f"damaged/{shard_name(0, 1)}.zarr"
    size = keys(s3, "damaged")[f"{shard_name(0, 1)}.zarr/train/tokens/c/1/0/0"]
    s3["client"].put_object(Bucket=BUCKET, Key=f"{store}/train/tokens/c/1/0/0", Body=b"\1" * size)
    assert verify_cache(url) == [f"{shard_name(0, 1)} train/tokens: rows {{}}-{{}} (chunk 1) fail their checksum"
                                 .format(*_rows(url, "train/tokens", 1))]
    s3["client"].delete_object(Bucket=BUCKET, Key=f"{store}/train/pooled_mean/c/0/0/0")
    with pytest.raises(AdlError, match=r"damaged: shard-00000-of-00001 train/pooled_mean: chunk 0 missing"):
        open_cache(url)
    res = runner.invoke(app, ["info", url, "--check"])
    assert res.exit_code == 2 and "train/pooled_mean: chunk 0 missing" in res.output


def _rows(url: str, key: str, chunk: int) -> tuple[int, int]:
    done = Location(url).read_json(f"{shard_name(0, 1)}.done.json")["arrays"][key]
    step = done["chunk_rows"]
    return chunk * step, min(done["rows"], (chunk + 1) * step) - 1


@pytest.mark.parametrize("args", [["train", "--cache", "CACHE", "--out", "s3://adl-test/runs/a"],
                                  ["sweep", "--cache", "CACHE", "--alpha", "1,2", "--out", "s3://adl-test/sweeps/a"],
                                  ["compare", "runs/x", "--out", "s3://adl-test/compare"]])
def test_run_folders_on_a_url_are_one_line(s3, whole, args):
    res = runner.invoke(app, [whole if a == "CACHE" else a for a in args])
    assert res.exit_code == 2 and "are written to a local disk" in res.output and "Traceback" not in res.output


def test_two_sweep_workers_read_one_s3_cache(s3, whole, tmp_path):
    """Workers of one study (here two processes with separate folders, as on two machines, and
    a shared journal storage) read the same s3:// cache; every point completes once."""
    import optuna

    from adl.sweep.study import open_storage

    url = f"journal:{tmp_path / 'study.log'}"
    cmd = [sys.executable, "-m", "adl", "sweep", "--cache", whole, "--storage", url, "--study", "s3-workers",
           "--alpha", "1,2,4,8", "--head", "adalayers-pooled", "--hidden", "8", "--max-epochs", "1",
           "--group-size", "1", "--baselines", "off"]
    procs = [subprocess.Popen([*cmd, "--out", str(tmp_path / f"w{i}")], env=child_env(s3["env"]),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    trials = optuna.load_study(study_name="s3-workers", storage=open_storage(url)).get_trials()
    assert sorted(t.user_attrs["adl_point"] for t in trials if t.state.name == "COMPLETE") == [0, 1, 2, 3]
