"""Batches from the cache: padding and masks, labels, streaming == loading whole, determinism."""

import numpy as np
import pytest
import torch

from adl.cache import open_cache
from adl.errors import AdlError
from adl.train.data import _blocks, _gather, load_data
from synthetic import write_synthetic_cache


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {"seq": write_synthetic_cache(d / "seq", n=(40, 8, 8)),
            "ner": write_synthetic_cache(d / "ner", task="token", n=(40, 8, 8))}


def _examples(split, epoch):
    """{example index: (z without padding, y)} over one pass, plus the batch order."""
    seen, order = {}, []
    for b in split.batches(6, epoch):
        order.append(b.index.tolist())
        for j, i in enumerate(b.index):
            n = int(b.mask[j].sum())
            assert bool(b.mask[j, :n].all()) and not bool(b.mask[j, n:].any())  # real tokens first
            assert torch.all(b.z[j, n:] == 0)
            assert i not in seen
            seen[int(i)] = (b.z[j, :n].clone(), b.y[j, :n].clone() if b.y.dim() == 2 else b.y[j].clone())
    return seen, order


@pytest.mark.parametrize("name", ["seq", "ner"])
def test_tokens_batches_match_the_cache(caches, name):
    cache = open_cache(caches[name])
    data = load_data(cache, "tokens", device="cpu", seed=0, memory_gb=1.0)
    values, offsets = cache.read("train", "tokens")
    labels = cache.labels("train")
    seen, _ = _examples(data.train, epoch=1)
    assert sorted(seen) == list(range(40))
    for i, (z, y) in seen.items():
        a, b = offsets[i], offsets[i + 1]
        np.testing.assert_array_equal(z.numpy(), values[a:b])
        np.testing.assert_array_equal(y.numpy(), labels[a:b] if name == "ner" else labels[i])


def test_streaming_gives_the_same_examples_with_bounded_blocks(caches):
    cache = open_cache(caches["ner"])
    L, D = 4, 8
    whole = load_data(cache, "tokens", device="cpu", seed=0, memory_gb=1.0)
    budget = 3 * 40 * L * D * 4 / 1e9  # room for ~40 tokens per block: far less than the split
    streamed = load_data(cache, "tokens", device="cpu", seed=0, memory_gb=budget)
    assert len(whole.train.blocks) == 1 and len(streamed.train.blocks) > 3
    longest = streamed.train.lengths.max()
    for a, e in streamed.train.blocks:  # the memory bound: each block holds <= max(40, longest) tokens
        assert streamed.train.offsets[e] - streamed.train.offsets[a] <= max(40, longest)
    a, _ = _examples(whole.train, epoch=3)
    b, _ = _examples(streamed.train, epoch=3)
    assert a.keys() == b.keys()
    for i in a:
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    # evaluation order is the cache order in both cases (flat predictions line up with labels)
    seq = [i for b_ in streamed.validation.batches(3) for i in b_.index]
    assert seq == list(range(8))


def test_the_next_block_is_read_while_the_current_one_trains(caches, monkeypatch):
    import threading

    from adl.train.data import SplitData

    cache = open_cache(caches["ner"])
    streamed = load_data(cache, "tokens", device="cpu", seed=0, memory_gb=3 * 40 * 4 * 8 * 4 / 1e9)
    reads, second = [], threading.Event()
    original = SplitData._read_block

    def read(self, b):
        reads.append(b)
        if len(reads) == 2:
            second.set()
        return original(self, b)

    monkeypatch.setattr(SplitData, "_read_block", read)
    batches = streamed.train.batches(2, epoch=0)
    first = next(batches)  # the first batch of the first block, still training
    assert second.wait(30) and len(reads) == 2  # the next block is already being read
    assert len(first.index) + sum(len(b.index) for b in batches) == streamed.train.n
    assert len(reads) == len(streamed.train.blocks)  # each block read once


def test_order_depends_only_on_seed_and_epoch(caches):
    cache = open_cache(caches["seq"])
    orders = {}
    for seed, epoch in ((0, 1), (0, 1), (0, 2), (1, 1)):
        data = load_data(cache, "tokens", device="cpu", seed=seed, memory_gb=1.0)
        orders.setdefault((seed, epoch), []).append(_examples(data.train, epoch)[1])
    assert orders[(0, 1)][0] == orders[(0, 1)][1]
    assert orders[(0, 1)][0] != orders[(0, 2)][0] and orders[(0, 1)][0] != orders[(1, 1)][0]


def test_pooled_batches(caches):
    cache = open_cache(caches["seq"])
    data = load_data(cache, "pooled:mean", device="cpu", seed=0, memory_gb=1.0)
    x = cache.read("train", "pooled:mean")
    batches = list(data.train.batches(16, epoch=1))
    assert [b.z.shape[0] for b in batches] == [16, 16, 8] and batches[0].mask is None
    idx = np.concatenate([b.index for b in batches])
    assert sorted(idx.tolist()) == list(range(40))
    np.testing.assert_array_equal(torch.cat([b.z for b in batches]).numpy(), x[idx])
    np.testing.assert_array_equal(torch.cat([b.y for b in batches]).numpy(), cache.labels("train")[idx])


def test_blocks_cover_everything_once():
    lengths = np.array([3, 3, 4, 9, 2, 2])
    assert _blocks(lengths, 7) == [(0, 2), (2, 3), (3, 4), (4, 6)]  # the 9-token example gets its own block
    assert _blocks(lengths, 100) == [(0, 6)]


def test_a_split_in_one_block_gets_the_same_batches_streamed_or_loaded(caches):
    cache = open_cache(caches["ner"])
    L, D = 4, 8
    total = sum(int(cache.offsets(s)[-1]) for s in ("train", "validation", "test")) * L * D * 4
    whole = load_data(cache, "tokens", device="cpu", seed=0, memory_gb=1.0)
    streamed = load_data(cache, "tokens", device="cpu", seed=0, memory_gb=(total - 1) / 1e9)
    assert streamed.train.blocks != whole.train.blocks  # the budget really streams
    for name in ("validation", "test"):
        a, b = getattr(whole, name), getattr(streamed, name)
        assert b._resident is None and len(b.blocks) == 1
        for x, y in zip(a.batches(3, epoch=5), b.batches(3, epoch=5), strict=True):
            assert x.index.tolist() == y.index.tolist()
            assert torch.equal(x.z, y.z) and torch.equal(x.y, y.y) and torch.equal(x.mask, y.mask)


def _eval_batches_equal(a, b):
    for x, y in zip(a.batches(3), b.batches(3), strict=True):
        assert x.index.tolist() == y.index.tolist() and torch.equal(x.z, y.z) and torch.equal(x.y, y.y)


@pytest.mark.parametrize("name,view", [("seq", "pooled:mean"), ("seq", "tokens"), ("ner", "tokens")])
def test_train_limit_keeps_a_seeded_sample_and_whole_eval_splits(caches, name, view):
    cache = open_cache(caches[name])

    def load(seed, limit):
        return load_data(cache, view, device="cpu", seed=seed, memory_gb=1.0, train_limit=limit)

    whole, a, again, other = load(0, None), load(0, 7), load(0, 7), load(1, 7)
    rows = a.train.rows
    assert a.train.n == 7 and len(set(rows.tolist())) == 7 and rows.tolist() == sorted(rows.tolist())
    assert np.array_equal(rows, again.train.rows) and not np.array_equal(rows, other.train.rows)
    labels = cache.labels("train")
    if view == "tokens":
        seen, _ = _examples(a.train, epoch=1)
        values, offsets = cache.read("train", "tokens")
    else:
        seen = {int(i): (b.z[j], b.y[j]) for b in a.train.batches(3, epoch=1) for j, i in enumerate(b.index)}
    assert sorted(seen) == list(range(7))
    for i, (z, y) in seen.items():  # example i of the sample is cache example rows[i], values and labels
        r = int(rows[i])
        if view == "tokens":
            np.testing.assert_array_equal(z.numpy(), values[offsets[r]:offsets[r + 1]])
            np.testing.assert_array_equal(y.numpy(), labels[offsets[r]:offsets[r + 1]] if name == "ner" else labels[r])
        else:
            np.testing.assert_array_equal(z.numpy(), cache.read("train", view)[r])
            assert int(y) == labels[r]
    for split in ("validation", "test"):
        assert getattr(a, split).rows is None and getattr(a, split).n == 8
        _eval_batches_equal(getattr(whole, split), getattr(a, split))
    assert load(0, 40).train.rows is None and load(0, 1000).train.n == 40  # a limit covering the split: all


def test_gather_reads_in_bounded_runs(caches):
    cache = open_cache(caches["ner"])
    values, offsets = cache.read("train", "tokens")
    rows = np.array([0, 3, 4, 17, 30, 39])
    want = np.concatenate([values[offsets[r]:offsets[r + 1]] for r in rows])
    for read_bytes in (1, 5 * 4 * 8 * 4, 1 << 28):  # one token, five tokens (runs split examples), all at once
        got, new_offsets, tokens = _gather(values, offsets, rows, read_bytes)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.diff(new_offsets), np.diff(offsets)[rows])
        np.testing.assert_array_equal(values[:][tokens], want)


def test_a_train_sample_counts_toward_the_memory_budget(caches):
    cache = open_cache(caches["ner"])
    row = 4 * 8 * 4
    whole = load_data(cache, "tokens", device="cpu", seed=0, memory_gb=1.0, train_limit=5)
    sample = int(whole.train.offsets[-1]) * row
    tight = load_data(cache, "tokens", device="cpu", seed=0, memory_gb=(sample + 20 * row) / 1e9, train_limit=5)
    assert tight.train._resident is not None and tight.validation._resident is None  # the others stream
    for split in ("train", "validation", "test"):  # the same examples (streamed batches end with blocks)
        a, b = _examples(getattr(whole, split), None)[0], _examples(getattr(tight, split), None)[0]
        assert a.keys() == b.keys() and all(torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
                                            for i in a)
    with pytest.raises(AdlError, match="--train-limit 5: the sample's tokens take"):
        load_data(cache, "tokens", device="cpu", seed=0, memory_gb=(sample - 1) / 1e9, train_limit=5)
