import csv

import numpy as np
import pytest
import torch

from conftest import SPLIT_ARGS
from sam_cache import EmbeddingStore, extract_dataset
from trainer import TrainConfig, train
from trainer.data import PairedCache
from trainer.stream import ShardStream, shard_order
from trainer.schedule import epoch_order


def test_shard_order_shuffles_whole_shards_through_buffers():
    rows = np.array([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 12, 13, 15])  # gaps: rows not in the split
    order, groups = shard_order(rows, shard_size=4, buffer_shards=2, rng=np.random.default_rng(0))
    assert sorted(order.tolist()) == rows.tolist()
    assert np.array_equal(np.concatenate(groups), order)
    shards_per_group = [set((g // 4).tolist()) for g in groups]
    assert [len(s) for s in shards_per_group] == [2, 2]
    assert set().union(*shards_per_group) == {0, 1, 2, 3}
    for g in groups:  # a buffer holds every row of its shards
        assert sorted(g.tolist()) == [r for r in rows.tolist() if r // 4 in set((g // 4).tolist())]
    again, _ = shard_order(rows, 4, 2, np.random.default_rng(0))
    other, _ = shard_order(rows, 4, 2, np.random.default_rng(1))
    assert np.array_equal(order, again) and not np.array_equal(order, other)
    with pytest.raises(ValueError, match="buffer_shards"):
        shard_order(rows, 4, 0, np.random.default_rng(0))


def test_shard_stream_reads_each_buffer_once_in_sorted_runs_and_serves_any_batch():
    rows = np.arange(40)
    _, groups = shard_order(rows, shard_size=5, buffer_shards=2, rng=np.random.default_rng(3))
    order = np.concatenate(groups)
    reads = []

    def read(sorted_rows):
        reads.append(sorted_rows.tolist())
        t = torch.as_tensor(sorted_rows, dtype=torch.float32)
        return t.view(-1, 1).repeat(1, 3), -t

    stream = ShardStream(read, groups)
    seen = []
    for start in range(0, len(order), 7):  # batches of 7 straddle buffers of 10
        batch = order[start:start + 7]
        img, emb = stream.take(batch)
        assert img[:, 0].tolist() == batch.tolist() and (-emb).tolist() == batch.tolist()
        seen += batch.tolist()
    stream.close()
    assert seen == order.tolist()
    assert stream.buffers_read == len(groups) == 4
    assert sorted(map(tuple, reads)) == sorted(tuple(sorted(g.tolist())) for g in groups)
    assert all(r == sorted(r) for r in reads)
    with pytest.raises(KeyError, match="not in this epoch"):
        ShardStream(read, groups).take(np.array([99]))


@pytest.fixture(scope="module")
def small_shards(sample_dir, tmp_path_factory):
    """The sample set in shards of 2 samples, so that an epoch spans several buffers."""
    out = tmp_path_factory.mktemp("stores") / "shards2.zarr"
    extract_dataset(sample_dir, out, "tiny", image_size=32, batch_size=4, num_workers=0, progress=False,
                    shard_size=2, **SPLIT_ARGS)
    return out


def test_streamed_batches_equal_the_in_memory_ones(small_shards):
    with EmbeddingStore.open(small_shards) as store:
        rows = store.split_indices("train")
        order, groups = epoch_order(rows, seed=0, pass_index=0, shards=(2, 2))
        host = PairedCache(store, rows, torch.device("cpu"), "host")
        stream = PairedCache(store, rows, torch.device("cpu"), "stream")
        stream.start_epoch(groups)
        for start in range(0, len(order), 3):
            batch = order[start:start + 3]
            a, b = host.batch(batch), stream.batch(batch)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        assert stream._stream.buffers_read == len(groups) > 1
        stream.end_epoch()
        assert stream._stream is None


def _orders(path):
    with open(path / "metrics.csv") as f:
        return [r["data_order"] for r in csv.DictReader(f)]


def test_streamed_slca_and_in_memory_no_slca_share_the_shard_order(small_shards, tmp_path):
    base = dict(cache=str(small_shards), epochs=2, batch_size=4, img_size=32, device="cpu", shuffle="shards",
                shuffle_buffer=4)
    lines = []
    streamed = train(TrainConfig(out=str(tmp_path / "s"), residency="stream", **base), log=lines.append)
    plain = train(TrainConfig(out=str(tmp_path / "p"), residency="host", slca=False, **base), log=lambda s: None)
    assert streamed["cache_mode"] == "stream" and plain["cache_mode"] == "host"
    assert "order: shard by shard, shuffle buffer of 2 shards (4 samples)" in lines
    assert _orders(tmp_path / "s") == _orders(tmp_path / "p")
    glob = train(TrainConfig(out=str(tmp_path / "g"), residency="host", **{**base, "shuffle": "global", "epochs": 1}),
                 log=lambda s: None)
    assert glob["cache_mode"] == "host"
    assert _orders(tmp_path / "g")[0] != _orders(tmp_path / "s")[0]
