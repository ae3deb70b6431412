"""Never delete what adl did not write: the --out folder checks and the folder lock (issue 11, 1)."""

import os
import shutil
import subprocess

import pytest
from tiny_backbones import bert_folder, write_csv

from adl.errors import AdlError
from adl.extract import plan
from adl.extract.config import ExtractConfig
from adl.extract.run import run_extract

IDENT, OTHER = {"request": {"views": ["pooled"]}}, {"request": {"views": ["tokens"]}}


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_git_init_folder_is_refused_and_kept(tmp_path, overwrite):
    root = tmp_path / "repo"
    root.mkdir()
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", str(root)], check=True)
    else:
        (root / ".git").mkdir()
        (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    before = tree(root)
    with pytest.raises(AdlError, match=r"not an adl cache \(\.git\); adl never deletes what it did not write"):
        plan.prepare_folder(root, IDENT, overwrite=overwrite, num_shards=1)
    assert tree(root) == before  # not even a lock file was added


def test_a_dotfiles_only_folder_is_refused(tmp_path):
    (tmp_path / ".bashrc").write_text("alias ll='ls -l'\n")
    (tmp_path / ".cache").mkdir()
    with pytest.raises(AdlError, match=r"\.bashrc, \.cache"):
        plan.prepare_folder(tmp_path, IDENT, overwrite=False, num_shards=1)
    assert (tmp_path / ".bashrc").read_text() == "alias ll='ls -l'\n"


def test_cache_like_names_with_a_hidden_file_are_kept_under_overwrite(tmp_path):
    root = tmp_path / "c"
    plan.prepare_folder(root, IDENT, overwrite=False, num_shards=1)
    (root / "manifest.json").write_text("{}")
    (root / "shard-00000-of-00001.zarr").mkdir()
    (root / ".env").write_text("SECRET=1\n")
    with pytest.raises(AdlError, match=r"\(\.env\)"):
        plan.prepare_folder(root, OTHER, overwrite=True, num_shards=1)
    assert (root / ".env").is_file() and (root / "manifest.json").is_file()


@pytest.mark.parametrize("name", ["shard-extra.zarr", "manifest.json.bak", "shard-0-of-1.h5", ".shard-x.lock"])
def test_only_exact_names_count_as_adl_entries(tmp_path, name):
    root = tmp_path / "c"
    plan.prepare_folder(root, IDENT, overwrite=False, num_shards=1)
    (root / name).write_text("mine")
    with pytest.raises(AdlError, match="not an adl cache"):
        plan.prepare_folder(root, OTHER, overwrite=True, num_shards=1)
    assert (root / name).read_text() == "mine"


def test_an_adl_name_of_the_wrong_kind_is_foreign(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "extract.json").mkdir()  # adl writes a file there, never a folder
    (root / "extract.json" / "notes.txt").write_text("mine")
    with pytest.raises(AdlError, match="not an adl cache"):
        plan.prepare_folder(root, IDENT, overwrite=True, num_shards=1)


def test_overwrite_removes_only_adl_entries_and_keeps_lock_files(tmp_path):
    root = tmp_path / "c"
    plan.prepare_folder(root, IDENT, overwrite=False, num_shards=1)
    for name in ("manifest.json", "shard-00000-of-00002.progress.json", ".manifest.json.123.tmp",
                 "projection.safetensors"):
        (root / name).write_text("{}")
    (root / "shard-00001-of-00002.zarr" / "train").mkdir(parents=True)
    assert plan.prepare_folder(root, OTHER, overwrite=True, num_shards=1) == "new"
    assert tree(root) == [".adl.lock", ".plan.lock", "extract.json"]


def test_a_symlinked_out_is_refused_and_its_target_kept(tmp_path):
    target = tmp_path / "real"
    plan.prepare_folder(target, IDENT, overwrite=False, num_shards=1)
    (target / "manifest.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(AdlError, match="is a symlink"):
        plan.prepare_folder(link, OTHER, overwrite=True, num_shards=1)
    assert (target / "manifest.json").is_file()


def test_a_symlinked_entry_is_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    root = tmp_path / "c"
    plan.prepare_folder(root, IDENT, overwrite=False, num_shards=1)
    (root / "shard-00000-of-00001.zarr").symlink_to(outside)
    with pytest.raises(AdlError, match="not an adl cache"):
        plan.prepare_folder(root, OTHER, overwrite=True, num_shards=1)
    assert (outside / "keep.txt").is_file()


def test_home_root_and_the_current_folder_are_refused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(AdlError, match="is your home folder"):
        plan.prepare_folder(home, IDENT, overwrite=True, num_shards=1)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(AdlError, match="is the current folder"):
        plan.prepare_folder(plan.Path("."), IDENT, overwrite=True, num_shards=1)
    with pytest.raises(AdlError, match="is the root folder"):
        plan.check_out(plan.Path("/"))
    assert os.listdir(home) == [] and os.listdir(work) == []


def test_overwrite_is_refused_while_a_writer_holds_the_folder(tmp_path):
    root = tmp_path / "c"
    running = plan.FolderLock(root)
    assert plan.prepare_folder(root, IDENT, overwrite=False, num_shards=1, folder=running) == "new"
    (root / "shard-00000-of-00001.progress.json").write_text("{}")
    try:
        with pytest.raises(AdlError, match="another adl extract is writing"):
            plan.prepare_folder(root, OTHER, overwrite=True, num_shards=1)
        # a peer shard of the same run works side by side (shared)
        peer = plan.FolderLock(root)
        assert plan.prepare_folder(root, IDENT, overwrite=False, num_shards=1, folder=peer) == "resume"
        peer.release()
    finally:
        running.release()
    assert (root / "shard-00000-of-00001.progress.json").is_file()
    assert plan.prepare_folder(root, OTHER, overwrite=True, num_shards=1) == "new"  # free once it ended


def test_run_extract_leaves_a_git_folder_alone(tmp_path):
    bert = bert_folder(tmp_path / "bert")
    data = write_csv(tmp_path / "d.csv", n=40)
    out = tmp_path / "out"
    (out / ".git").mkdir(parents=True)
    (out / ".git" / "config").write_text("[core]\n")
    with pytest.raises(AdlError, match="not an adl cache"):
        run_extract(ExtractConfig(model=str(bert), dataset=f"csv:{data}", out=str(out), overwrite=True,
                                  progress=False))
    assert tree(out) == [".git", ".git/config"]
