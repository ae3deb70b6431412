"""Stage-one components without a backbone: config, layers, pooling, batching, sharding,
projection, device choice, view choice, the plan file."""

import json

import numpy as np
import pytest
import torch

from adl.cache.projection import FILE as PROJECTION_FILE
from adl.cache.projection import Projection
from adl.errors import AdlError
from adl.extract import models, plan, pooling, projection, tokenize
from adl.extract.config import ExtractConfig, layer_indices
from adl.extract.run import shard_of


# ---- config and layers --------------------------------------------------------------
def test_config_normalises_and_validates():
    cfg = ExtractConfig(model="m", dataset="d", views="pooled, tokens", pool=["mean", "max"], layers=[0, -1])
    assert cfg.views == ("pooled", "tokens") and cfg.pool == ("mean", "max") and cfg.layers == "0,-1"
    for kwargs, match in [
        (dict(views="pooled,words"), "unknown --views 'words'; use one of pooled, tokens"),
        (dict(pool="median"), "unknown --pool 'median'"),
        (dict(dtype="bfloat16"), "unknown --dtype 'bfloat16'; use one of float16, float32"),
        (dict(format="npz"), "--format"),
        (dict(device="tpu"), "--device"),
        (dict(batch_size=0), "--batch-size must be an integer >= 1"),
        (dict(project=True), "--project must be an integer"),
        (dict(num_shards=2, shard_index=2), "--shard-index 2 must be below --num-shards 2"),
        (dict(layers="1,x"), "--layers '1,x': cannot read 'x'"),
        (dict(views="tokens", pool="mean"), "--pool needs the pooled view"),
        (dict(views="pooled", project=8), "--project applies to the tokens view"),
    ]:
        with pytest.raises(AdlError, match=match):
            ExtractConfig(model="m", dataset="d", **kwargs)


@pytest.mark.parametrize("spec, expected", [
    (None, [0, 1, 2, 3, 4, 5, 6]), ("0,3,6", [0, 3, 6]), ("-4:", [3, 4, 5, 6]), ("::2", [0, 2, 4, 6]),
    ("-1", [6]), ("1:3,6", [1, 2, 6]), ("0:7", list(range(7))), ("6,0,6", [0, 6]),
])
def test_layer_indices(spec, expected):
    assert layer_indices(spec, 7) == expected


@pytest.mark.parametrize("spec", ["7", "-8", "0,9", "-9:", "0:8", "3:1", "::0"])
def test_layer_indices_out_of_range_names_the_valid_range(spec):
    with pytest.raises(AdlError, match=r"valid indices are 0\.\.6 \(or -7\.\.-1\)"):
        layer_indices(spec, 7)


# ---- pooling --------------------------------------------------------------------------
def test_pooling_matches_a_hand_computation_over_real_tokens():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 5, 4)).astype(np.float32)
    lengths = [5, 2, 1]
    mask = np.array([[1] * n + [0] * (5 - n) for n in lengths])
    h[mask == 0] = 1e4  # padding must never leak into a pool
    got = {k: pooling.pool(k, torch.tensor(h), torch.tensor(mask)).numpy() for k in pooling.POOLERS}
    for b, n in enumerate(lengths):
        real = h[b, :n]
        np.testing.assert_allclose(got["mean"][b], real.mean(0), rtol=1e-6)
        np.testing.assert_array_equal(got["cls"][b], real[0])
        np.testing.assert_array_equal(got["last"][b], real[-1])
        np.testing.assert_array_equal(got["max"][b], real.max(0))


# ---- labels, batches, shards ------------------------------------------------------------
def test_align_labels_first_subtoken_only():
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    assert tokenize.align_labels(word_ids, [3, 1, 4]).tolist() == [-100, 3, -100, 1, 4, -100, -100, -100]
    assert tokenize.align_labels(word_ids, None).tolist() == [-100] * 8


def _tokenized(lengths, seed=0):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = len(lengths)
    return tokenize.TokenizedSplit("train", np.arange(100, 100 + n), rng.integers(5, 50, offsets[-1]).astype(np.int32),
                                   offsets, 0, True, labels=np.arange(n) % 3)


def test_batches_sorted_by_length_and_collated_with_right_padding():
    ts = _tokenized([3, 7, 2, 7, 5])
    batches = tokenize.make_batches(ts.lengths, 2)
    assert [b.tolist() for b in batches] == [[1, 3], [4, 0], [2]]  # longest first, ties in order
    ids, mask = tokenize.collate(ts, batches[1], pad=0)
    assert ids.shape == (2, 5) and mask.sum(1).tolist() == [5, 3]
    np.testing.assert_array_equal(ids[1, :3], ts.input_ids[0:3])
    assert (ids[1, 3:] == 0).all()


def test_token_budget_shrinks_batches_of_long_rows():
    lengths = np.array([10, 100, 50, 100, 20, 30, 5])
    batches = tokenize.make_batches(lengths, batch_size=3, max_tokens=200)
    assert [b.tolist() for b in batches] == [[1, 3], [2, 5, 4], [0, 6]]  # 2 x 100, 3 x 50, 2 x 10
    assert all(len(b) * lengths[b].max() <= 200 for b in batches)
    assert [len(b) for b in tokenize.make_batches(lengths, 3, max_tokens=50)][0] == 1  # one long row still runs
    assert ExtractConfig(model="m", dataset="d", batch_size=8).token_budget == 1024


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_shards_concatenate_to_the_one_process_order(num_shards):
    lengths = np.random.default_rng(1).integers(1, 40, 23)
    ts = _tokenized(lengths)
    batches = tokenize.make_batches(ts.lengths, 4)
    ranges = tokenize.partition(batches, ts.lengths, num_shards)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(batches)
    assert all(a[1] == b[0] for a, b in zip(ranges[:-1], ranges[1:]))
    whole = tokenize.shard_layout(ts, batches)
    parts = [tokenize.shard_layout(ts, batches[a:b]) for a, b in ranges]
    np.testing.assert_array_equal(np.concatenate([p.ids for p in parts]), whole.ids)
    np.testing.assert_array_equal(np.concatenate([p.labels for p in parts]), whole.labels)
    assert sum(p.n_tokens for p in parts) == whole.n_tokens
    if num_shards == 2:  # balanced by padded tokens: neither half is empty
        assert all(p.n > 0 for p in parts)


def test_view_bytes_formula():
    ts = _tokenized([3, 4])
    sizes = tokenize.view_bytes({"train": ts}, n_layers=5, hidden=8, token_dim=2, n_pools=2, itemsize=2)
    assert sizes == {"pooled": 2 * 5 * 8 * 2 * 2, "tokens": 7 * 5 * 2 * 2}


# ---- projection -------------------------------------------------------------------------
def test_pca_projection_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))  # correlated features
    m = projection.Moments(1, 6, "cpu")
    for chunk in np.array_split(x, 3):
        m.add(0, torch.tensor(chunk, dtype=torch.float32))
        m.n += len(chunk)
    mean, matrix = m.pca(2)
    a = torch.nn.functional.gelu(torch.tensor(x, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(mean[0], a.mean(0), rtol=1e-5, atol=1e-6)
    vals, vecs = np.linalg.eigh(np.cov(a, rowvar=False))
    top = vecs[:, ::-1][:, :2]
    np.testing.assert_allclose(np.abs(matrix[0].numpy().T @ top), np.eye(2), atol=1e-4)  # same directions
    np.testing.assert_allclose(matrix[0].numpy().T @ matrix[0].numpy(), np.eye(2), atol=1e-5)
    assert all(col[np.abs(col).argmax()] > 0 for col in matrix[0].numpy().T)  # sign convention


def test_projection_apply_save_load_and_random_seed(tmp_path):
    p = projection.random_projection(8, 3, [0, 2], seed=5)
    assert torch.equal(p.matrix, projection.random_projection(8, 3, [0, 2], seed=5).matrix)
    assert not torch.equal(p.matrix, projection.random_projection(8, 3, [0, 2], seed=6).matrix)
    x = torch.randn(4, 2, 8)  # (n, L, H)
    expected = torch.stack([torch.nn.functional.gelu(x[:, j]) @ p.matrix[j] for j in range(2)], 1)
    torch.testing.assert_close(p.apply(x), expected)
    p.save(tmp_path / PROJECTION_FILE)
    q = Projection.load(tmp_path / PROJECTION_FILE)
    assert (q.method, q.dim, q.seed, q.layers) == ("random", 3, 5, [0, 2])
    assert torch.equal(q.matrix, p.matrix) and q.entry()["activation"] == "gelu"
    with pytest.raises(AdlError, match="wider than the model's hidden size 8"):
        projection.check_dim(9, 8)


def test_sample_rows_reaches_the_token_budget():
    lengths = np.full(100, 10)
    rows = projection.sample_rows(lengths, 55, seed=0)
    assert len(rows) == 6 and (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(rows, projection.sample_rows(lengths, 55, seed=0))


# ---- device, limits, views, shards ------------------------------------------------------
@pytest.mark.parametrize("cuda, bf16, requested, expected", [
    (False, False, "auto", ("cpu", None, False)),
    (True, True, "auto", ("cuda:0", torch.bfloat16, True)),
    (True, False, "auto", ("cuda:0", torch.float16, True)),
    (True, True, "cpu", ("cpu", None, False)),
    (True, True, "cuda", ("cuda:0", torch.bfloat16, True)),
])
def test_device_selection(monkeypatch, cuda, bf16, requested, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    p = models.select_device(requested)
    assert (p.device, p.autocast, p.pin_memory) == expected
    assert p.identity()["device"] == expected[0].split(":")[0]


def test_cuda_requested_but_absent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AdlError, match="--device cuda, but .* sees no CUDA device: use --device cpu"):
        models.select_device("cuda")


def test_max_length_clamped_with_a_warning():
    assert models.resolve_max_length(None, 512) == (512, None)
    assert models.resolve_max_length(None, None) == (512, None)
    assert models.resolve_max_length(128, 512) == (128, None)
    length, warning = models.resolve_max_length(1000, 512)
    assert length == 512 and "exceeds the model's limit of 512" in warning


def test_model_limit_respects_roberta_position_offset():
    from transformers import BertConfig, RobertaConfig

    class Tok:
        model_max_length = int(1e30)

    assert models.model_limit(Tok(), BertConfig(max_position_embeddings=64)) == 64
    assert models.model_limit(Tok(), RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512


def test_choose_views():
    sizes = {"pooled": 10, "tokens": 1000}
    assert plan.choose_views(None, "sequence", sizes, free=10_000) == (["pooled", "tokens"], None)
    views, note = plan.choose_views(None, "sequence", sizes, free=1500)
    assert views == ["pooled"] and "tokens view skipped" in note
    with pytest.raises(AdlError, match="use --project 64, --views pooled or fewer --layers"):
        plan.choose_views(None, "token", sizes, free=500)  # NER needs tokens
    with pytest.raises(AdlError, match="NER.* needs the tokens view"):
        plan.choose_views(("pooled",), "token", sizes, free=10_000)
    with pytest.raises(AdlError, match="needs about 1.0 KB"):
        plan.choose_views(("tokens",), "sequence", sizes, free=999)


def test_shards_default_to_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert shard_of(ExtractConfig(model="m", dataset="d")) == (3, 4)
    assert shard_of(ExtractConfig(model="m", dataset="d", num_shards=2, shard_index=0)) == (0, 2)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert shard_of(ExtractConfig(model="m", dataset="d")) == (0, 1)


# ---- the plan file ------------------------------------------------------------------------
def test_prepare_folder_states(tmp_path):
    root = tmp_path / "c"
    a, b = {"request": {"views": None}}, {"request": {"views": ["pooled"]}}
    assert plan.prepare_folder(root, a, overwrite=False, num_shards=1) == "new"
    assert plan.prepare_folder(root, a, overwrite=False, num_shards=1) == "resume"
    (root / "manifest.json").write_text("{}")
    assert plan.prepare_folder(root, a, overwrite=False, num_shards=1) == "complete"
    with pytest.raises(AdlError, match=r"already holds another extraction \(differs in request.views\)"):
        plan.prepare_folder(root, b, overwrite=False, num_shards=1)
    assert plan.prepare_folder(root, b, overwrite=True, num_shards=1) == "new"
    assert not (root / "manifest.json").exists()
    assert json.loads((root / plan.PLAN).read_text())["identity"] == b
    assert plan.settle(root, lambda: {"views": ["pooled"]}) == {"views": ["pooled"]}
    assert plan.settle(root, lambda: 1 / 0) == {"views": ["pooled"]}  # decided once


def test_prepare_folder_never_wipes_a_foreign_folder(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(AdlError, match="not an adl cache"):
        plan.prepare_folder(tmp_path, {"x": 1}, overwrite=True, num_shards=1)
    assert (tmp_path / "thesis.tex").exists()
