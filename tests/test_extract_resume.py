"""Interruption and scale-out: kill -9 then resume is bit-identical; a full disk keeps what was
committed; two concurrent shard processes equal one process."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_backbones import bert_folder, write_conll, write_csv

from adl.cache import open_cache, read_json, shard_name
from adl.cache.backends import ZarrBackend, open_backend
from adl.cache.shards import FORMATS
from adl.errors import AdlError
from adl.extract.config import ExtractConfig
from adl.extract.run import run_extract

ROOT = Path(__file__).resolve().parents[1]
CRASH = """
import json, os, signal, sys
from adl.cache.writer import ShardWriter
original, calls = ShardWriter.commit, [0]
def commit(self, split, n):
    calls[0] += 1
    if calls[0] == {kill_at}:  # die on the background thread, batch written but not committed
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, split, n)
ShardWriter.commit = commit
from adl.extract.config import ExtractConfig
from adl.extract.run import run_extract
run_extract(ExtractConfig(**json.loads(sys.argv[1])))
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"bert": str(bert_folder(root / "bert")), "csv": f"csv:{write_csv(root / 'd.csv', n=80)}",
            "conll": f"conll:{write_conll(root / 'd.conll', n=60)}"}


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def stored(root: Path, fmt: str, shards: int = 1) -> dict:
    """Every array of every shard store, raw (stored dtype), keyed by shard/split/name."""
    out = {}
    for i in range(shards):
        store = open_backend(root / f"{shard_name(i, shards)}{FORMATS[fmt]}", fmt, "r")
        for split in ("train", "validation", "test"):
            for name in ("ids", "offsets", "labels", "word_ids", "token_labels", "pooled_mean", "tokens"):
                if store.has(f"{split}/{name}"):
                    out[f"{i}/{split}/{name}"] = np.asarray(store.array(f"{split}/{name}")[:])
        store.close()
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("fmt, data", [("zarr", "csv"), ("hdf5", "conll")])
def test_kill_9_then_rerun_is_bit_identical(assets, tmp_path, fmt, data):
    kw = dict(model=assets["bert"], dataset=assets[data], views=["pooled", "tokens"], batch_size=4, format=fmt,
              progress=False)
    run_extract(ExtractConfig(out=str(tmp_path / "whole"), **kw))
    crashed = ExtractConfig(out=str(tmp_path / "crashed"), **kw)
    script = tmp_path / "crash.py"
    script.write_text(CRASH.replace("{kill_at}", "6"))
    proc = subprocess.run([sys.executable, str(script), json.dumps(crashed.to_dict())], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    progress = read_json(tmp_path / "crashed" / f"{shard_name(0, 1)}.progress.json")
    assert progress["train"] == 5 and not (tmp_path / "crashed" / "manifest.json").exists()
    with pytest.raises(AdlError, match="not a complete adl cache"):
        open_cache(tmp_path / "crashed")
    run_extract(crashed)  # the same command again: resumes at batch 6
    assert_identical(stored(tmp_path / "whole", fmt), stored(tmp_path / "crashed", fmt))
    assert open_cache(tmp_path / "crashed").manifest["splits"] == open_cache(tmp_path / "whole").manifest["splits"]


def test_full_disk_keeps_committed_batches_and_resumes(assets, tmp_path, monkeypatch):
    kw = dict(model=assets["bert"], dataset=assets["csv"], views=["pooled", "tokens"], batch_size=4, progress=False)
    run_extract(ExtractConfig(out=str(tmp_path / "whole"), **kw))
    original, calls = ZarrBackend.write, [0]

    def write(self, name, start, data):
        if name.endswith(("pooled_mean", "tokens")):
            calls[0] += 1
            if calls[0] > 7:  # batch 4's token write fails
                raise OSError(errno.ENOSPC, "No space left on device")
        original(self, name, start, data)

    monkeypatch.setattr(ZarrBackend, "write", write)
    cfg = ExtractConfig(out=str(tmp_path / "full"), **kw)
    with pytest.raises(AdlError, match="disk full while writing .* rerun the same command; committed batches are kept"):
        run_extract(cfg)
    assert read_json(tmp_path / "full" / f"{shard_name(0, 1)}.progress.json")["train"] == 3
    monkeypatch.setattr(ZarrBackend, "write", original)
    run_extract(cfg)
    assert_identical(stored(tmp_path / "whole", "zarr"), stored(tmp_path / "full", "zarr"))


def test_two_shard_processes_equal_one_process(assets, tmp_path):
    args = ["--model", assets["bert"], "--dataset", assets["csv"], "--views", "pooled,tokens", "--dtype", "float32",
            "--batch-size", "4"]
    procs = [subprocess.Popen([sys.executable, "-m", "adl", "extract", *args, "--out", str(tmp_path / "two"),
                               "--num-shards", "2", "--shard-index", str(i)], env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    run_extract(ExtractConfig(model=assets["bert"], dataset=assets["csv"], views="pooled,tokens", dtype="float32",
                              batch_size=4, out=str(tmp_path / "one"), progress=False))
    two, one = open_cache(tmp_path / "two"), open_cache(tmp_path / "one")
    assert two.manifest["num_shards"] == 2 and two.manifest["splits"] == one.manifest["splits"]
    parts = stored(tmp_path / "two", "zarr", 2)
    assert len(parts["0/train/ids"]) > 0 and len(parts["1/train/ids"]) > 0  # both did work
    for split in one.splits:
        np.testing.assert_array_equal(two.ids(split), one.ids(split))
        np.testing.assert_array_equal(two.labels(split), one.labels(split))
        np.testing.assert_allclose(two.read(split, "pooled:mean"), one.read(split, "pooled:mean"), rtol=1e-5, atol=1e-6)
        v2, o2 = two.read(split, "tokens")
        v1, o1 = one.read(split, "tokens")
        np.testing.assert_array_equal(o2, o1)
        np.testing.assert_allclose(np.asarray(v2), np.asarray(v1), rtol=1e-5, atol=1e-6)


def test_a_second_writer_gets_a_lock_error(assets, tmp_path):
    from adl.cache import ShardWriter

    holder = ShardWriter(tmp_path / "c", "zarr")
    try:
        with pytest.raises(AdlError, match="another adl extract is writing"):
            run_extract(ExtractConfig(model=assets["bert"], dataset=assets["csv"], out=str(tmp_path / "c"),
                                      progress=False))
    finally:
        holder.close()


def test_more_shards_than_batches_leaves_empty_parts(assets, tmp_path):
    """validation/test hold 8 rows = 1 batch of 8: two of the three shards store nothing for them."""
    kw = dict(model=assets["bert"], dataset=assets["csv"], views="pooled,tokens", dtype="float32", batch_size=8,
              format="hdf5", progress=False)
    results = [run_extract(ExtractConfig(out=str(tmp_path / "three"), num_shards=3, shard_index=i, **kw))
               for i in (2, 0, 1)]
    assert results[0] is None and results[1] is None and results[2]["num_shards"] == 3  # last one finalises
    assert len(stored(tmp_path / "three", "hdf5", 3)["2/test/ids"]) == 0
    run_extract(ExtractConfig(out=str(tmp_path / "one"), **kw))
    three, one = open_cache(tmp_path / "three"), open_cache(tmp_path / "one")
    for split in one.splits:
        np.testing.assert_array_equal(three.ids(split), one.ids(split))
        np.testing.assert_allclose(three.read(split, "pooled:mean"), one.read(split, "pooled:mean"),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(three.read(split, "tokens")[1], one.read(split, "tokens")[1])
