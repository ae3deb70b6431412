"""Fault injection on tiny models (issue 11, 2, 4 and 6): kill -9 at random writes, full disks
(injected and a real small filesystem), tampered resumes, bad data refused at extraction."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_extract_resume import assert_identical, env, stored
from tiny_backbones import bert_folder, write_csv

from adl.cache import ShardWriter, SplitLayout, finalize, open_cache, read_json, shard_name, verify_cache
from adl.cache.backends import HDF5Backend
from adl.errors import AdlError
from adl.extract.config import ExtractConfig
from adl.extract.models import load_tokenizer, tokenizer_hash
from adl.extract.run import run_extract

ROOT = Path(__file__).resolve().parents[1]
KILL = """
import json, os, signal, sys
from adl.cache import backends
cls = getattr(backends, sys.argv[2])
original, calls = cls.write, [0]
def write(self, name, start, data):
    calls[0] += 1
    if calls[0] == {at} and {before}:
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, name, start, data)
    if calls[0] == {at}:
        os.kill(os.getpid(), signal.SIGKILL)
cls.write = write
from adl.extract.config import ExtractConfig
from adl.extract.run import run_extract
run_extract(ExtractConfig(**json.loads(sys.argv[1])))
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-assets")
    return {"bert": str(bert_folder(root / "bert")), "csv": f"csv:{write_csv(root / 'd.csv', n=80)}", "root": root}


def config(assets, out, **kw):
    base = dict(model=assets["bert"], dataset=assets["csv"], views=["pooled", "tokens"], batch_size=4,
                progress=False)
    return ExtractConfig(out=str(out), **{**base, **kw})


@pytest.mark.parametrize("fmt, seed", [("zarr", 1), ("zarr", 2), ("hdf5", 3), ("hdf5", 4)])
def test_kill_9_at_a_random_write_then_rerun_is_bit_identical(assets, tmp_path, fmt, seed):
    rng = random.Random(seed)
    run_extract(config(assets, tmp_path / "whole", format=fmt))
    crashed = config(assets, tmp_path / "crashed", format=fmt)
    script = tmp_path / "kill.py"
    script.write_text(KILL.replace("{at}", str(rng.randint(1, 45))).replace("{before}", str(rng.random() < 0.5)))
    backend = {"zarr": "ZarrBackend", "hdf5": "HDF5Backend"}[fmt]
    proc = subprocess.run([sys.executable, str(script), json.dumps(crashed.to_dict()), backend], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run_extract(crashed)
    assert_identical(stored(tmp_path / "whole", fmt), stored(tmp_path / "crashed", fmt))
    assert verify_cache(tmp_path / "crashed") == []


def test_hdf5_full_disk_is_one_user_error(assets, tmp_path, monkeypatch):
    """h5py reports ENOSPC as RuntimeError with the C errno in its text."""
    def full(self, name, start, data):
        raise RuntimeError("Can't synchronously write data (file write failed: errno = 28, error message = "
                           "'No space left on device')")

    monkeypatch.setattr(HDF5Backend, "write", full)
    with pytest.raises(AdlError, match="disk full while writing .* committed batches are kept"):
        run_extract(config(assets, tmp_path / "c", format="hdf5"))


def _small_filesystem_works() -> bool:
    probe = "mkdir -p /tmp/adl-probe && mount -t tmpfs -o size=1m tmpfs /tmp/adl-probe"
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


SLOW_CLI = """
import sys, time
from adl.cache import backends
for cls in (backends.ZarrBackend, backends.HDF5Backend):
    def slow(self, name, start, data, _write=cls.write):
        time.sleep(0.05)  # leaves the test time to fill the disk while batches are written
        _write(self, name, start, data)
    cls.write = slow
from adl.cli import main
sys.argv[0] = "adl"
main()
"""


@pytest.mark.skipif(not _small_filesystem_works(), reason="needs unprivileged user+mount namespaces")
@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_real_full_disk_is_one_line_then_the_rerun_matches(assets, tmp_path, fmt):
    """A 16 MB tmpfs in a private mount namespace, filled up once the first batch is committed:
    the CLI ends with one error line (exit 2); with the space freed, the same command finishes
    a cache identical to an unhindered run."""
    run_extract(config(assets, tmp_path / "whole", format=fmt))
    mnt, copy, slow = tmp_path / "mnt", tmp_path / "after", tmp_path / "slow.py"
    mnt.mkdir()
    slow.write_text(SLOW_CLI)
    cmd = (f"{sys.executable} {slow} extract --model {assets['bert']} --dataset {assets['csv']} "
           f"--views pooled,tokens --batch-size 4 --format {fmt} --out {mnt}/c")
    progress = f"{mnt}/c/{shard_name(0, 1)}.progress.json"
    script = (f"mount -t tmpfs -o size=16m tmpfs {mnt} || exit 1; ({cmd} 2> {tmp_path}/err1; echo $? > {tmp_path}/rc1) & "
              f"while [ ! -e {progress} ]; do sleep 0.01; done; cat /dev/zero > {mnt}/filler 2>/dev/null; wait; "
              f"rm {mnt}/filler; {cmd} 2> {tmp_path}/err2; echo $? > {tmp_path}/rc2; cp -r {mnt}/c {copy}")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env(), check=True, timeout=600)
    err = (tmp_path / "err1").read_text()
    assert (tmp_path / "rc1").read_text().strip() == "2", err
    assert "Traceback" not in err and "Exception" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: disk full while writing"), err
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    assert_identical(stored(tmp_path / "whole", fmt), stored(copy, fmt))
    assert verify_cache(copy) == []


def test_a_resume_checks_the_stored_rows(tmp_path):
    lay = SplitLayout(ids=np.arange(4), offsets=np.arange(5), labels=np.array([0, 1, 0, 1]))
    w = ShardWriter(tmp_path, "zarr")
    w.create({"train": lay}, {"pooled_mean": ((2, 3), 2)}, "float16", 2)
    w.close()
    moved = SplitLayout(ids=np.array([1, 0, 2, 3]), offsets=np.arange(5), labels=np.array([1, 0, 0, 1]))
    again = ShardWriter(tmp_path, "zarr")
    with pytest.raises(AdlError, match="stored train/ids differ from the rows this run computed.*--overwrite"):
        again.create({"train": moved}, {"pooled_mean": ((2, 3), 2)}, "float16", 2)
    again.close()
    again = ShardWriter(tmp_path, "zarr")
    with pytest.raises(AdlError, match=r"train/pooled_mean is not a float16 array of shape \(4, 2, 4\)"):
        again.create({"train": lay}, {"pooled_mean": ((2, 4), 2)}, "float16", 2)
    again.close()


def test_the_identity_holds_the_tokenizer_and_transformers(assets, tmp_path):
    import transformers

    run_extract(config(assets, tmp_path / "c", views="pooled"))
    ident = read_json(tmp_path / "c" / "extract.json")["identity"]
    assert ident["transformers"] == transformers.__version__
    tok = load_tokenizer(assets["bert"], "sequence")
    assert ident["tokenizer"]["sha256"] == tokenizer_hash(tok) == tokenizer_hash(load_tokenizer(assets["bert"],
                                                                                               "sequence"))
    changed = Path(assets["root"]) / "bert-lower"
    shutil.copytree(assets["bert"], changed)
    cfg = json.loads((changed / "tokenizer_config.json").read_text())
    (changed / "tokenizer_config.json").write_text(json.dumps({**cfg, "do_lower_case": not cfg.get("do_lower_case",
                                                                                                   True)}))
    assert tokenizer_hash(load_tokenizer(str(changed), "sequence")) != ident["tokenizer"]["sha256"]


def test_the_manifest_is_written_once(assets, tmp_path):
    first = run_extract(config(assets, tmp_path / "c", views="pooled"))
    before = (tmp_path / "c" / "manifest.json").read_bytes()
    fields = {k: v for k, v in first.items() if k not in ("schema_version", "adl_version", "created")}
    assert finalize(tmp_path / "c", 1, {**fields, "extraction_seconds": 99.0}) == first  # a late finisher
    assert (tmp_path / "c" / "manifest.json").read_bytes() == before


def test_done_json_records_rows_and_chunk_checksums(assets, tmp_path):
    run_extract(config(assets, tmp_path / "c"))
    done = read_json(tmp_path / "c" / f"{shard_name(0, 1)}.done.json")
    rec = done["arrays"]["train/tokens"]
    assert rec["rows"] == open_cache(tmp_path / "c").manifest["splits"]["train"]["tokens"]
    assert len(rec["crc32"]) == -(-rec["rows"] // rec["chunk_rows"])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_nan_states_are_refused_naming_split_and_layer(assets, tmp_path, dtype):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(assets["bert"])
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight.fill_(float("nan"))  # layer 2 of the 3 hidden states
    folder = tmp_path / "nan"
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(assets["bert"]) / f, folder / f)
    with pytest.raises(AdlError, match=r"hidden states are NaN in split 'train', layer 2 \(pooled_mean"):
        run_extract(config(assets, tmp_path / "c", model=str(folder), views="pooled", dtype=dtype))


def test_fewer_than_two_classes_are_refused_with_counts(assets, tmp_path):
    data = tmp_path / "one.csv"
    data.write_text("text,label\n" + "".join(f"good movie {i},pos\n" for i in range(30)))
    with pytest.raises(AdlError, match=r"fewer than two classes \(pos: 24\)"):
        run_extract(config(assets, tmp_path / "c", dataset=f"csv:{data}"))
    assert not (tmp_path / "c").exists()


def test_integer_ner_tags_without_names_are_refused(assets, tmp_path):
    data = tmp_path / "ner.jsonl"
    data.write_text("".join(json.dumps({"tokens": ["john", "sat"], "ner_tags": [1, 0]}) + "\n" for _ in range(30)))
    with pytest.raises(AdlError, match="integer tags .* without tag names.* write the tags as strings"):
        run_extract(config(assets, tmp_path / "c", dataset=f"jsonl:{data}"))


def test_markup_in_labels_is_printed_literally(assets, tmp_path):
    from rich.console import Console

    from adl.cache.summary import summary

    data = tmp_path / "m.csv"
    data.write_text("text,label\n" + "".join(f"good movie {i},{'[/]' if i % 2 else '[x]'}\n" for i in range(40)))
    run_extract(config(assets, tmp_path / "[red]c", dataset=f"csv:{data}", views="pooled"))
    console = Console(record=True, width=200)
    with open_cache(tmp_path / "[red]c") as cache:
        assert cache.label_names == ["[/]", "[x]"]
    console.print(summary(tmp_path / "[red]c"))
    text = console.export_text()
    assert "[/], [x]" in text and "[red]c" in text
