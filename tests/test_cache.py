"""The cache store: both formats, shards read as one, manifest checks, lock, resume state."""

import errno
import json

import numpy as np
import pytest

from adl.cache import BackgroundWriter, ShardWriter, SplitLayout, finalize, open_cache
from adl.cache.manifest import SCHEMA_VERSION
from adl.errors import AdlError

L, H = 3, 4


def manifest_fields(fmt, n_per_split):
    return {
        "model": {"id": "tiny"},
        "tokenizer": {"max_length": 16},
        "dataset": {"name": "toy"},
        "task": "sequence",
        "label_names": ["a", "b"],
        "splits": {s: {"n": n, "labeled": True} for s, n in n_per_split.items()},
        "layers": list(range(L)),
        "views": ["pooled:mean", "tokens"],
        "hidden_size": H,
        "token_dim": H,
        "dtype": "float16",
        "format": fmt,
        "projection": None,
    }


def write_shard(root, fmt, index, count, lengths, rng, first_id):
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    n = len(lengths)
    lay = SplitLayout(ids=np.arange(first_id, first_id + n), offsets=offsets, labels=np.arange(n) % 2)
    pooled = rng.normal(size=(n, L, H)).astype(np.float16)
    tokens = rng.normal(size=(offsets[-1], L, H)).astype(np.float16)
    w = ShardWriter(root, fmt, index, count)
    w.create({"train": lay}, {"pooled_mean": ((L, H), 2), "tokens": ((L, H), 4)}, "float16", 2)
    w.write("train", "pooled_mean", 0, pooled)
    w.write("train", "tokens", 0, tokens)
    w.commit("train", 1)
    w.finish({"train": n})
    w.close()
    return pooled, tokens, offsets


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_two_shards_read_as_one(tmp_path, fmt):
    rng = np.random.default_rng(0)
    a = write_shard(tmp_path, fmt, 0, 2, [2, 3, 1], rng, 0)
    with pytest.raises(AdlError, match="not a complete adl cache"):
        open_cache(tmp_path)
    assert finalize(tmp_path, 2, manifest_fields(fmt, {"train": 5})) is None  # shard 1 missing
    b = write_shard(tmp_path, fmt, 1, 2, [4, 2], rng, 3)
    assert finalize(tmp_path, 2, manifest_fields(fmt, {"train": 5}))["schema_version"] == SCHEMA_VERSION
    c = open_cache(tmp_path)
    assert c.splits == ["train"]
    np.testing.assert_array_equal(c.read("train", "pooled:mean"), np.concatenate([a[0], b[0]]).astype(np.float32))
    values, offsets = c.read("train", "tokens")
    np.testing.assert_array_equal(offsets, [0, 2, 5, 6, 10, 12])
    assert values.shape == (12, L, H)
    np.testing.assert_array_equal(values[4:8], np.concatenate([a[1], b[1]])[4:8].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(values), np.concatenate([a[1], b[1]]).astype(np.float32))
    np.testing.assert_array_equal(c.ids("train"), np.arange(5))
    assert c.labels("train").tolist() == [0, 1, 0, 0, 1]
    assert c.nbytes("train", "tokens") >= 12 * L * H * 2
    with pytest.raises(AdlError, match="re-extract with `adl extract ... --views pooled --pool cls`"):
        c.read("train", "pooled:cls")
    with pytest.raises(AdlError, match="no split 'test'"):
        c.read("test", "tokens")


def test_manifest_checks(tmp_path):
    with pytest.raises(AdlError, match="no cache at"):
        open_cache(tmp_path / "nowhere")
    write_shard(tmp_path, "zarr", 0, 1, [1], np.random.default_rng(0), 0)
    finalize(tmp_path, 1, manifest_fields("zarr", {"train": 1}))
    m = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**m, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(AdlError, match=r"newer adl .*`pip install -U adalayers`"):
        open_cache(tmp_path)
    del m["views"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AdlError, match="incomplete"):
        open_cache(tmp_path)


def test_second_writer_gets_lock_error_and_resume_reopens(tmp_path):
    lay = SplitLayout(ids=np.arange(4), offsets=np.arange(5))
    w = ShardWriter(tmp_path, "zarr")
    w.create({"train": lay}, {"pooled_mean": ((L, H), 2)}, "float16", 2)
    with pytest.raises(AdlError, match="another adl extract is writing"):
        ShardWriter(tmp_path, "zarr")
    w.write("train", "pooled_mean", 0, np.ones((2, L, H)))
    w.commit("train", 1)
    w.close()
    again = ShardWriter(tmp_path, "zarr")
    again.create({"train": lay}, {"pooled_mean": ((L, H), 2)}, "float16", 2)
    assert again.done_batches("train") == 1
    assert again.store.array("train/pooled_mean")[1, 0, 0] == 1  # kept, not recreated
    again.close()


def test_background_writer_turns_full_disk_into_user_error(tmp_path):
    class FullDisk:
        root = tmp_path

        def write(self, *args):
            raise OSError(errno.ENOSPC, "No space left on device")

    bg = BackgroundWriter(FullDisk())
    bg.write("train", "tokens", 0, np.zeros(1))
    with pytest.raises(AdlError, match="disk full"):
        bg.join()


def test_splits_come_train_validation_test_first(tmp_path):
    write_shard(tmp_path, "zarr", 0, 1, [1], np.random.default_rng(0), 0)
    finalize(tmp_path, 1, manifest_fields("zarr", {"unlabeled": 1, "test": 1, "train": 1, "validation": 1}))
    assert open_cache(tmp_path).splits == ["train", "validation", "test", "unlabeled"]
