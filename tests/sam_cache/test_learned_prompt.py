"""Mask sets in one store, and the prompt learned from the cache (``samcache masks --prompt learned``)."""

import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.samcache import app
from conftest import with_square_masks
from sam_cache import EmbeddingStore
from sam_cache.errors import ConfigError
from sam_cache.learned_prompt import HeadRecipe, map_box
from sam_cache.masks import decode_masks
from sam_cache.store import StoreError

runner = CliRunner(env={"COLUMNS": "200"})
QUICK = HeadRecipe(width=8, epochs=2)


def test_a_store_keeps_several_mask_sets_and_each_is_replaced_alone(tiny_store, tmp_path):
    store = with_square_masks(tiny_store, tmp_path)
    decode_masks(store, prompt="box", progress=False)  # the default set
    with EmbeddingStore.open(store) as s:
        truth = s.mask_set("gt").read(np.arange(len(s)))
        assert list(s.mask_sets) == ["default", "gt"]
    refused = runner.invoke(app, ["masks", str(store), "--prompt", "candidates", "--no-progress"])
    assert refused.exit_code == 1 and "--mask-set NAME to keep both" in refused.output
    again = runner.invoke(app, ["masks", str(store), "--prompt", "candidates", "--overwrite", "--no-progress"])
    assert again.exit_code == 0, again.output
    with EmbeddingStore.open(store) as s:  # the other set is untouched by --overwrite of the default one
        np.testing.assert_array_equal(s.mask_set("gt").read(np.arange(len(s))), truth)
        assert s.mask_set().signature["prompt"] == "candidates"
        with pytest.raises(StoreError, match="has no mask set 'nope' \\(it has: default, gt\\)"):
            s.mask_set("nope").read(np.arange(2))
        with pytest.raises(StoreError, match="must be 1-40 letters"):
            s.mask_set("../x")
    info = runner.invoke(app, ["info", str(store)])
    assert "default: 15 done, prompt candidates" in info.output and "gt: 15 done, from test squares" in info.output


def test_training_carries_the_mask_set_it_names(tiny_store, tmp_path):
    import torch

    from trainer.config import TrainConfig
    from trainer.data import PairedCache

    store = with_square_masks(tiny_store, tmp_path)
    cfg = TrainConfig(cache=str(store), out=str(tmp_path / "r"), focus="overlay", mask_set="gt")
    assert cfg.focus_masks == "gt" and cfg.replace(focus="none").focus_masks is None
    with pytest.raises(ConfigError, match="mask_set"):
        cfg.replace(mask_set="a b")
    with EmbeddingStore.open(store) as s:
        rows = np.arange(len(s))
        with PairedCache(s, rows, torch.device("cpu"), "host", embeddings=False, masks="gt") as c:
            img = c._read(rows, "images")
            np.testing.assert_array_equal(img[:, 3].numpy(), s.mask_set("gt").read(rows)[:, 0])
        with pytest.raises(Exception, match="has no masks in mask set 'learned' .*its mask sets: gt"):
            PairedCache(s, rows, torch.device("cpu"), "host", embeddings=False, masks="learned")


def test_the_learned_prompt_reads_no_validation_or_test_mask(tiny_store, tmp_path, monkeypatch):
    store = with_square_masks(tiny_store, tmp_path)
    read = []
    original = EmbeddingStore.read_rows

    def spy(self, indices, name="embeddings", verify=True):
        read.append((name, np.asarray(indices).copy()))
        return original(self, indices, name, verify)

    monkeypatch.setattr(EmbeddingStore, "read_rows", spy)
    decode_masks(store, prompt="learned", learn_from="gt", mask_set="learned", recipe=QUICK, progress=False)
    monkeypatch.undo()
    with EmbeddingStore.open(store, "r+") as s:
        train = set(s.split_indices("train").tolist())
        held_out = np.flatnonzero(s.splits != "train")
        first = s.mask_set("learned")
        boxes, head = first.boxes.copy(), first.signature["head_sha256"]
        assert len(held_out) and first.done.all()
        # behaviour: scribble over every val and test mask of the ground truth, and learn again
        s.mask_set("gt").write(held_out, np.ones((len(held_out), 1, 64, 64), np.uint8),
                               np.ones(len(held_out), np.float32), np.zeros((len(held_out), 4), np.float32))
    mask_reads = [rows for name, rows in read if name == "masks.gt"]
    assert mask_reads and all(set(r.tolist()) <= train for r in mask_reads)
    decode_masks(store, prompt="learned", learn_from="gt", mask_set="again", recipe=QUICK, progress=False)
    with EmbeddingStore.open(store) as s:
        assert s.mask_set("again").signature["head_sha256"] == head
        np.testing.assert_array_equal(s.mask_set("again").boxes, boxes)


def test_the_learned_set_resumes_with_its_own_head_and_refuses_another_recipe(tiny_store, tmp_path, monkeypatch):
    import sam_cache.learned_prompt as lp

    store = with_square_masks(tiny_store, tmp_path)
    r = decode_masks(store, prompt="learned", learn_from="gt", mask_set="learned", recipe=QUICK, split="test",
                     progress=False)
    with EmbeddingStore.open(store) as s:
        sig = s.mask_set("learned").signature
        assert r["written"] == r["total"] == len(s.split_indices("test")) and sig["learned_from"]["mask_set"] == "gt"
        assert sig["head"]["epochs"] == 2 and sig["prompt"] == "learned" and len(sig["head_sha256"]) == 64

    def no_training(*a, **k):
        raise AssertionError("a resumed run trained another head")

    monkeypatch.setattr(lp, "train_head", no_training)
    rest = decode_masks(store, prompt="learned", learn_from="gt", mask_set="learned", recipe=QUICK, progress=False)
    assert rest["already_done"] == r["written"] and rest["written"] == 15 - r["written"] and rest["total"] == 15
    monkeypatch.undo()
    with pytest.raises(StoreError, match="head.epochs: store has 2, this run asks for 3"):
        decode_masks(store, prompt="learned", learn_from="gt", mask_set="learned",
                     recipe=HeadRecipe(width=8, epochs=3), progress=False)
    with pytest.raises(ConfigError, match="cannot write the mask set it learns from"):
        decode_masks(store, prompt="learned", learn_from="gt", mask_set="gt", progress=False)
    with pytest.raises(ConfigError, match="needs one of --learn-from"):
        decode_masks(store, prompt="learned", mask_set="x", progress=False)
    with pytest.raises(StoreError, match="no mask set 'none' to learn the prompt from"):
        decode_masks(store, prompt="learned", learn_from="none", mask_set="y", progress=False)


def test_map_box_takes_the_largest_region_and_stays_in_the_image():
    p = np.zeros((16, 16), np.float32)
    p[2:4, 2:4] = 0.9    # small and sure
    p[8:14, 6:12] = 0.7  # large: the lesion
    p[15, 15] = 1.0      # outside the image's valid region
    np.testing.assert_array_equal(map_box(p, (14, 14), grow=1), [5, 7, 13, 14])
    faint = np.zeros((16, 16), np.float32)
    faint[3:6, 4:9] = 0.3  # nothing reaches 0.5: the region above half the peak
    np.testing.assert_array_equal(map_box(faint, (16, 16), grow=0), [4, 3, 9, 6])
    np.testing.assert_array_equal(map_box(np.zeros((16, 16)), (10, 12)), [0, 0, 12, 10])


def test_the_head_context_widens_what_a_cell_sees():
    import torch

    from sam_cache.learned_prompt import LesionHead

    torch.manual_seed(0)
    x = torch.randn(1, 16, 32, 32)
    poked = x.clone()
    poked[0, :, 16, 16] += 5.0
    for context, reach in ((0, False), (2, True)):
        head = LesionHead(width=4, in_channels=16, context=context).eval()
        head.net[1] = torch.nn.Identity()  # its norm is over the whole map; the convolutions' reach is tested
        with torch.no_grad():
            change = (head(poked) - head(x)).abs()[0, 0]
        assert change.shape == (32, 32)
        assert bool(change[16, 16 + 6] > 0) == reach  # 6 cells away: beyond a 5x5 field, inside 17x17
    with pytest.raises(ConfigError, match="context"):
        HeadRecipe(context=9).check()


def test_new_images_get_masks_from_the_head_learned_on_the_training_store(tiny_store, tmp_path):
    store = with_square_masks(tiny_store, tmp_path)
    decode_masks(store, prompt="learned", learn_from="gt", mask_set="learned", recipe=QUICK, progress=False)
    new = tmp_path / "new.zarr"  # another store of the same encoder, without any mask of its own
    shutil.copytree(tiny_store, new)
    result = runner.invoke(app, ["masks", str(new), "--prompt", "learned", "--head-from", f"{store}:learned",
                                 "--mask-set", "learned", "--no-progress"])
    assert result.exit_code == 0, result.output
    with EmbeddingStore.open(store) as a, EmbeddingStore.open(new) as b:
        np.testing.assert_array_equal(a.mask_set("learned").boxes, b.mask_set("learned").boxes)
        assert b.mask_set("learned").signature["head_sha256"] == a.mask_set("learned").signature["head_sha256"]
        assert b.mask_set("learned").signature["head_from"]["mask_set"] == "learned"
    refused = runner.invoke(app, ["masks", str(new), "--prompt", "learned", "--head-from", f"{store}:gt",
                                  "--mask-set", "x", "--no-progress"])
    assert refused.exit_code == 1 and "has no learned mask set 'gt' that keeps its head" in refused.output
    both = runner.invoke(app, ["masks", str(new), "--prompt", "learned", "--head-from", f"{store}:learned",
                               "--learn-from", "gt", "--mask-set", "y", "--no-progress"])
    assert both.exit_code == 1 and "needs one of --learn-from" in both.output


def test_presence_gives_an_empty_mask_where_the_head_sees_no_lesion_and_the_same_mask_elsewhere(
        tiny_store, tmp_path, monkeypatch):
    import dataclasses

    import torch

    import sam_cache.learned_prompt as lp

    store = with_square_masks(tiny_store, tmp_path)
    decode_masks(store, prompt="learned", learn_from="gt", mask_set="all", recipe=QUICK, progress=False)
    with EmbeddingStore.open(store) as s:
        head = lp.load_head(s.mask_set("all").kept_head, QUICK.width, QUICK.context)
        assert "presence" not in s.mask_set("all").signature["head"]  # sets made before the field keep their signature
        with torch.no_grad():
            peaks = torch.sigmoid(head(torch.from_numpy(s.read_rows(np.arange(len(s)))).float())).flatten(1).amax(1)
    cut = float(peaks.median())  # some rows below it, some above
    monkeypatch.setattr(lp, "train_head", lambda *a, **k: head)  # the same head, so only the presence rule differs
    r = decode_masks(store, prompt="learned", learn_from="gt", mask_set="some",
                     recipe=dataclasses.replace(QUICK, presence=cut), progress=False)
    absent = (peaks < cut).numpy()
    assert 0 < absent.sum() < len(absent) and r["empty"] >= absent.sum()
    with EmbeddingStore.open(store) as s:
        every, some = s.mask_set("all").read(np.arange(len(s))), s.mask_set("some").read(np.arange(len(s)))
        assert s.mask_set("some").signature["head"]["presence"] == cut
    assert every[~absent].any() and (some[absent] == 0).all()  # no lesion seen: an empty mask
    np.testing.assert_array_equal(some[~absent], every[~absent])  # a lesion seen: the same decoded mask
    with pytest.raises(ConfigError, match="presence must be between 0 and 1"):
        HeadRecipe(presence=1.5).check()


def test_two_writers_adding_mask_sets_to_one_store_keep_both(tiny_store, tmp_path):
    """Two ``samcache masks`` runs on one store (each holds it open from before the other wrote)
    each record their own set; neither drops the other's (a lost update lost a whole set once)."""
    import fcntl

    from sam_cache.store.backends import META_LOCK

    store = with_square_masks(tiny_store, tmp_path)
    with EmbeddingStore.open(store) as s:
        n = len(s)
    first, second = EmbeddingStore.open(store, "r+"), EmbeddingStore.open(store, "r+")
    try:
        for s, name in ((first, "one"), (second, "two")):  # `second` still holds the attributes of before "one"
            s.prepare_masks({"decoder": None, "prompt": "file", "source": name}, mask_set=name).write(
                np.arange(n), np.ones((n, 1, 64, 64), np.uint8), np.ones(n, np.float32), np.zeros((n, 4), np.float32))
        first.update_meta(suspect=[])  # a later write through the older handle keeps "two" as well
        with first._b.meta_lock(), open(store / META_LOCK) as f:  # the lock is exclusive while held
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        first.close()
        second.close()
    with EmbeddingStore.open(store) as s:
        assert {"gt", "one", "two"} <= set(s.mask_sets)
        assert s.mask_set("one").done.all() and s.mask_set("two").done.all()


def test_lock_files_are_removed_when_their_jobs_end_and_never_let_two_holders_in(tiny_store, tmp_path):
    """A store kept its lock files after every job, and zarr warned about each one whenever a user
    listed the store. Now a lock file lives only while it is held; eight threads that each take the
    attributes' lock forty times, while its file is removed and made again under them, never
    overlap (a lost increment would show an overlap)."""
    import threading
    import warnings

    import zarr

    from sam_cache.store.backends import META_LOCK, held_lock_file

    store = with_square_masks(tiny_store, tmp_path)  # a mask set written: the attributes' lock taken
    with EmbeddingStore.writer_lock(store, "masks-x"):
        assert (store / ".samcache.masks-x.lock").read_text().startswith("pid ")
    assert not list(store.glob(".samcache*")), list(store.glob(".samcache*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "embeddings" in set(zarr.open_group(store, mode="r").keys())

    counter, inside, overlaps = tmp_path / "counter", [], []
    counter.write_text("0")

    def bump():
        for _ in range(40):
            with held_lock_file(str(store / META_LOCK)):
                inside.append(1)
                if len(inside) > 1:  # an assert here would end only its own thread, not fail the test
                    overlaps.append(len(inside))
                counter.write_text(str(int(counter.read_text()) + 1))
                inside.pop()

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [], "two holders at once"
    assert counter.read_text() == "320" and not (store / META_LOCK).exists()


def test_a_store_opened_read_only_refuses_every_write_and_names_itself(tiny_store, tmp_path):
    """Rows, done flags, attributes, mask sets and a kept head all pass one check; nothing changes."""
    store = with_square_masks(tiny_store, tmp_path)
    with EmbeddingStore.open(store) as s:
        before, n, ms = dict(s.meta), len(s), s.mask_set("gt")
        writes = {
            "rows": lambda: s.write_rows(0, np.zeros((1,) + s.embed_shape, np.float32), s.orig_size[:1],
                                         s.valid[:1], s.window[:1]),
            "done": lambda: s.mark_done(np.arange(1)),
            "attributes": lambda: s.update_meta(suspect=[]),
            "new set": lambda: s.prepare_masks({"decoder": None, "prompt": "file"}, mask_set="new"),
            "masks": lambda: ms.write(np.arange(1), np.zeros((1, 1, 64, 64), np.uint8), np.ones(1, np.float32),
                                      np.zeros((1, 4), np.float32)),
            "head": lambda: ms.keep_head(b"head"),
            "drop": ms.drop,
        }
        for write in writes.values():
            with pytest.raises(StoreError, match=f"store {re.escape(str(store))} is open read-only"):
                write()
    with EmbeddingStore.open(store) as s:
        assert s.meta == before and "new" not in s.mask_sets and s.mask_set("gt").done.sum() == n
        assert s.mask_set("gt").kept_head is None
