"""Damage is named, never read as data: verify_cache and open_cache on deleted, truncated and
corrupted files, bad manifests; and the training data's own checks (NaN/inf, one class)."""

import json
import os

import numpy as np
import pytest
import torch
import zarr
from synthetic import write_synthetic_cache

from adl.cache import open_cache, verify_cache
from adl.errors import AdlError
from adl.train.data import load_data

SHARD = "shard-00000-of-00001"


@pytest.fixture(params=["zarr", "hdf5"])
def cache(request, tmp_path):
    return write_synthetic_cache(tmp_path / "c", n=(96, 48, 48), fmt=request.param), request.param


def test_a_whole_cache_verifies_clean(cache):
    root, _ = cache
    assert verify_cache(root) == []


def chunk(root, name, i):
    return root / f"{SHARD}.zarr" / name / "c" / str(i) / "0" / "0"


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_deleted_or_truncated_zarr_chunk_is_named_and_never_read(tmp_path, damage):
    root = write_synthetic_cache(tmp_path / "c", n=(96, 48, 48))
    path = chunk(root, "train/tokens", 1)
    path.unlink() if damage == "delete" else os.truncate(path, path.stat().st_size // 2)
    problems = verify_cache(root)
    assert len(problems) == 1 and problems[0].startswith(f"{SHARD} train/tokens: chunk 1 "), problems
    with pytest.raises(AdlError, match=f"is damaged: {SHARD} train/tokens: chunk 1 .* --check"):
        open_cache(root)


def test_changed_bytes_fail_their_checksum(cache):
    root, fmt = cache
    if fmt == "zarr":
        arr = zarr.open_array(str(root / f"{SHARD}.zarr" / "validation" / "pooled_mean"), mode="r+")
        arr[20] = arr[20] + 1  # the chunk file stays whole: only the checksum can tell
    else:
        import h5py

        with h5py.File(root / f"{SHARD}.h5", "r+") as f:
            f["validation/pooled_mean"][20] += 1
    problems = verify_cache(root)
    assert problems == [f"{SHARD} validation/pooled_mean: rows 16-31 (chunk 1) fail their checksum"]


def test_a_truncated_hdf5_shard_is_named(tmp_path):
    root = write_synthetic_cache(tmp_path / "c", fmt="hdf5")
    path = root / f"{SHARD}.h5"
    os.truncate(path, path.stat().st_size // 2)
    assert verify_cache(root)[0].startswith(f"{SHARD}: store {SHARD}.h5 cannot be opened")
    with pytest.raises(AdlError, match="cannot be opened"):
        open_cache(root)


def test_a_missing_shard_or_done_file_is_named(cache):
    root, fmt = cache
    (root / f"{SHARD}.done.json").unlink()
    assert verify_cache(root) == [f"{SHARD}: {SHARD}.done.json is missing or unreadable (FileNotFoundError)"]
    store = root / f"{SHARD}.{'zarr' if fmt == 'zarr' else 'h5'}"
    store.rename(root / "elsewhere")
    with pytest.raises(AdlError, match=f"{SHARD}: store {store.name} is missing"):
        open_cache(root)


@pytest.mark.parametrize("manifest, message", [
    (lambda text, m: text[: len(text) // 2], "unreadable or truncated"),
    (lambda text, m: json.dumps([m]), "no schema_version"),
    (lambda text, m: json.dumps({**m, "schema_version": 1}), "older adl .* --overwrite"),
    (lambda text, m: json.dumps({**m, "splits": ["train"]}), r"malformed \(bad splits\)"),
    (lambda text, m: json.dumps({**m, "num_shards": 0}), "malformed"),
    (lambda text, m: json.dumps({**m, "format": "parquet"}), "unknown format 'parquet'"),
])
def test_bad_manifests_are_one_line_with_the_fix(tmp_path, manifest, message):
    root = write_synthetic_cache(tmp_path / "c")
    path = root / "manifest.json"
    text = path.read_text()
    path.write_text(manifest(text, json.loads(text)))
    with pytest.raises(AdlError, match=message):
        open_cache(root)
    problems = verify_cache(root)
    assert len(problems) == 1 and problems[0].startswith("manifest")


def poison(root, split, layer, value, name="pooled_mean"):
    arr = zarr.open_array(str(root / f"{SHARD}.zarr" / split / name), mode="r+")
    row = np.asarray(arr[3])
    row[layer, 0] = value
    arr[3] = row


@pytest.mark.parametrize("split, value", [("train", np.nan), ("validation", np.inf), ("test", np.nan)])
def test_nan_or_inf_in_any_split_is_one_error_naming_split_and_layer(tmp_path, split, value):
    root = write_synthetic_cache(tmp_path / "c")
    poison(root, split, 2, value)
    with pytest.raises(AdlError, match=f"split '{split}' of the cache holds NaN or inf in layer 2 of the pooled:mean"):
        load_data(open_cache(root), "pooled:mean", device="cpu", seed=0, memory_gb=1.0)


def test_finite_values_whose_sum_overflows_float32_are_data(tmp_path):
    root = write_synthetic_cache(tmp_path / "c", dtype="float32")
    poison(root, "train", 2, 3e38)
    poison(root, "train", 3, 3e38)  # two huge finite values: their float32 sum is inf
    data = load_data(open_cache(root), "pooled:mean", device="cpu", seed=0, memory_gb=1.0)
    assert bool(torch.isfinite(data.train.x).all()) and float(data.train.x.max()) == pytest.approx(3e38, rel=1e-6)


@pytest.mark.parametrize("memory_gb", [1.0, 1e-6])  # loaded whole, and streamed block by block
def test_nan_in_the_tokens_view_is_caught_loaded_or_streamed(tmp_path, memory_gb):
    root = write_synthetic_cache(tmp_path / "c")
    poison(root, "validation", 1, np.nan, name="tokens")
    with pytest.raises(AdlError, match="split 'validation' of the cache holds NaN or inf in layer 1 of the tokens"):
        data = load_data(open_cache(root), "tokens", device="cpu", seed=0, memory_gb=memory_gb)
        for _ in data.validation.batches(8):
            pass


def test_a_train_split_with_one_class_is_refused_at_training(tmp_path):
    root = write_synthetic_cache(tmp_path / "c", n_classes=1)
    with pytest.raises(AdlError, match=r"fewer than two classes \(class0: 96\)"):
        load_data(open_cache(root), "pooled:mean", device="cpu", seed=0, memory_gb=1.0)


def test_adl_info_check_names_the_damage_and_exits_2(tmp_path):
    from typer.testing import CliRunner

    from adl.cli import app

    root = write_synthetic_cache(tmp_path / "c", n=(96, 48, 48))
    ok = CliRunner().invoke(app, ["info", str(root), "--check"])
    assert ok.exit_code == 0 and "verified" in ok.output
    chunk(root, "train/tokens", 1).unlink()
    bad = CliRunner().invoke(app, ["info", str(root), "--check"])
    assert bad.exit_code == 2 and "is damaged (1 problem(s))" in bad.output
    assert f"{SHARD} train/tokens: chunk 1" in bad.output and "Traceback" not in bad.output


def test_adl_info_reads_no_chunk_but_names_a_missing_shard(cache):
    """The summary stops at the shards' records: a deleted chunk is --check's to find, a missing
    store or done.json is named at once (exit 2)."""
    from typer.testing import CliRunner

    from adl.cli import app

    root, fmt = cache
    if fmt == "zarr":
        chunk(root, "train/tokens", 1).unlink()
        assert CliRunner().invoke(app, ["info", str(root)]).exit_code == 0
    (root / f"{SHARD}.done.json").unlink()
    for args in (["info", str(root)], ["info", str(root), "--json"]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert f"is damaged: {SHARD}: {SHARD}.done.json is missing or unreadable" in " ".join(res.output.split())


def test_the_sizes_adl_info_prints_are_those_of_the_stored_chunks(cache):
    from adl.cache.summary import finished, stored_bytes

    root, fmt = cache
    _, manifest, records = finished(root)
    with open_cache(root) as c:
        for split in c.splits:
            for view in c.views:
                name = "tokens" if view == "tokens" else "pooled_mean"
                if fmt == "zarr":  # the chunk files on disk (the array's own zarr.json aside)
                    files = (root / f"{SHARD}.zarr" / split / name / "c").rglob("*")
                    want = sum(p.stat().st_size for p in files if p.is_file())
                else:  # the chunks HDF5 allocated
                    want = c.nbytes(split, view)
                assert stored_bytes(manifest, records, split, view) == want > 0
