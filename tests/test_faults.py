"""Fault injection: what a careless or hostile user can do to samcache, and what each test promises.

Data loss and code execution
- ``--overwrite`` deletes only a samcache store: never a user's folder, never the dataset.
- A full disk (a real small tmpfs where the test may mount one, an injected ENOSPC otherwise),
  for Zarr and HDF5: the run exits 1 naming the cause, no row is marked done unless written, and a
  rerun with space repairs the store.
- A checkpoint that carries a pickled payload is refused by every command that loads one (eval,
  predict, export, resume, the gate benchmark), and the payload never runs.

One bad file does not stop a run
- A strip of 4000x1 pixels is extracted; an image above the pixel limit, and file names full of
  rich markup, are skipped, named literally in the report (exit 3), and the rest is stored.

Training does not go ahead on wrong data
- An incomplete store is refused without ``--allow-partial`` and says how many samples it has; a
  class missing from a split is named; deleted, truncated and corrupted shards stop training and
  ``samcache verify`` names the shard and the samples.

Clear errors
- Bad option values fail at once with one line and exit 1 (YAML ``lr: 1e-3``, a bad
  ``select_metric`` or ``residency``, ``--batch-size 0`` and ``1``, ``--epochs 0``,
  ``--img-size 0``, ``--backbone-kwargs`` that is not JSON); so do read-only output folders, an
  empty or text checkpoint, a full disk while a checkpoint is saved (no ``.tmp`` is left), and a
  store killed in its first milliseconds.

Kills and concurrency
- SIGKILL at several random moments of an extraction, each followed by a resume: the store equals
  an uninterrupted one. A reader that opens the store while it is written sees only complete rows.
"""

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.samcache import app as samcache
from cli.slca_train import app as slca_train
from conftest import ROOT, SPLIT_ARGS
from sam_cache import EmbeddingStore, StoreError, extract_dataset, verify_store
from trainer import TrainConfig, TrainError, train

runner = CliRunner(env={"COLUMNS": "250"})
SPLIT = ["--val-fraction", "0.2", "--test-fraction", "0.2"]
EXTRACT = ["extract", "--encoder", "tiny", "--image-size", "32", "--workers", "0", "--no-progress", *SPLIT]


def _extract(dataset, out, *extra):
    return runner.invoke(samcache, [*EXTRACT, "--dataset", str(dataset), "--out", str(out), *extra])


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A small (or read-only) tmpfs at ``path``, or None where this machine does not let us mount."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                              capture_output=True).returncode == 0
    try:
        yield path if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only_folder(tmp_path: Path):
    """A folder nobody can write to: a read-only tmpfs as root, ``chmod 555`` otherwise."""
    if os.geteuid() == 0:
        with tmpfs(tmp_path / "ro", "1m", readonly=True) as p:
            if p is None:
                pytest.skip("a read-only folder needs a mount (root without mount rights cannot be refused a write)")
            yield p
    else:
        p = tmp_path / "ro"
        p.mkdir()
        p.chmod(0o555)
        try:
            yield p
        finally:
            p.chmod(0o755)


# --- data loss and code execution -----------------------------------------------------------------

def test_overwrite_never_deletes_what_is_not_a_store(sample_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("draft")
    result = _extract(sample_dir, victim, "--overwrite")
    assert result.exit_code == 1 and "is not a samcache store, so --overwrite will not delete it" in result.output
    assert (victim / "thesis.txt").read_text() == "draft"
    result = _extract(sample_dir, victim)
    assert result.exit_code == 1 and "exists and is not a samcache store" in result.output
    assert "--overwrite" not in result.output.split("store;")[-1]  # no invitation to delete it
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    n = sum(1 for _ in data.rglob("*.png"))
    for out in (data, data / "synthetic-normal"):
        result = _extract(data, out, "--overwrite")
        assert result.exit_code == 1 and "holds the dataset" in result.output
    assert sum(1 for _ in data.rglob("*.png")) == n


def test_overwrite_never_deletes_an_hdf5_file_that_is_not_positively_a_store(sample_dir, tmp_path):
    """Issue 21.2: any HDF5 file that failed to open counted as a store, and --overwrite deleted it."""
    import h5py

    held = tmp_path / "user.h5"
    with h5py.File(held, "w") as f:
        f["data"] = np.arange(10)
    big = tmp_path / "big.h5"
    with h5py.File(big, "w") as f:
        f["data"] = np.random.default_rng(0).random((200, 200))
    truncated = tmp_path / "t.h5"
    truncated.write_bytes(big.read_bytes()[:300_000 // 2])
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, time; f = h5py.File({str(held)!r}, 'a'); "
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        for victim in (held, truncated):
            before = victim.read_bytes()
            result = _extract(sample_dir, victim, "--overwrite")
            assert result.exit_code == 1 and "so --overwrite will not delete it" in result.output, result.output
            assert victim.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_full_disk_marks_nothing_done_that_was_not_written_and_a_rerun_repairs(sample_dir, tmp_path, fmt,
                                                                                monkeypatch):
    small = tmp_path / "small"
    with tmpfs(tmp_path / "disk", "80m") as disk:
        if disk is not None:  # a real full disk: 80 MiB with 10 MiB free, for a store of 15 x 2 MiB
            out = disk / f"s.{fmt}"
            (disk / "ballast").write_bytes(b"\0" * (70 << 20))
            result = _extract(sample_dir, out, "--batch-size", "2")
        else:  # an injected one: the 4th write of embedding rows fails with ENOSPC
            from sam_cache import store as store_module

            out = small / f"s.{fmt}"
            small.mkdir()
            calls = {"n": 0}
            original = store_module.EmbeddingStore.write_rows

            def failing(self, *a, **k):
                calls["n"] += 1
                if calls["n"] == 4:
                    raise OSError(28, "No space left on device")
                return original(self, *a, **k)

            monkeypatch.setattr(store_module.EmbeddingStore, "write_rows", failing)
            result = _extract(sample_dir, out, "--batch-size", "2")
            monkeypatch.undo()
        assert result.exit_code == 1, result.output
        assert "no space left on device" in result.output.lower()
        assert "Traceback" not in result.output
        with EmbeddingStore.open(out) as s:
            done = int(s.done.sum())
        assert done < 15
        assert verify_store(out) == [], "a done row that was not written"
        if disk is not None:
            (disk / "ballast").unlink()
        again = _extract(sample_dir, out)
        assert again.exit_code == 0, again.output
        assert f"({done} already done, 15 in all)" in " ".join(again.output.split())
        assert verify_store(out) == []


@pytest.mark.slow
def test_hdf5_on_a_full_disk_keeps_a_readable_store_that_resumes(sample_dir, tmp_path):
    """Issue 21.1: the report rewritten after a failed write damaged the HDF5 attribute for good."""
    with tmpfs(tmp_path / "disk", "20m") as disk:  # 15 rows of 2 MiB do not fit
        if disk is None:
            pytest.skip("needs a tmpfs mount")
        out = disk / "b.h5"
        result = _extract(sample_dir, out)
        assert result.exit_code == 1 and "no space left on device" in result.output.lower(), result.output
        assert "Traceback" not in result.output
        info = runner.invoke(samcache, ["info", str(out)])
        assert info.exit_code == 0 and "cannot be read" not in info.output, info.output
        with EmbeddingStore.open(out) as s:
            done = int(s.done.sum())
            assert not s.repaired and 0 < done < 15
        assert verify_store(out) == []
        subprocess.run(["mount", "-o", "remount,size=80m", str(disk)], check=True)  # the disk is enlarged
        again = _extract(sample_dir, out)
        assert again.exit_code == 0, again.output
        assert f"({done} already done, 15 in all)" in " ".join(again.output.split())
        assert verify_store(out) == []


@pytest.mark.slow
def test_a_damaged_hdf5_attribute_is_repaired_from_the_creation_record(tiny_store, sample_dir, tmp_path):
    """Issue 21.1: a store that has lost its attribute is read, and repaired, from its own arrays."""
    import h5py

    with tmpfs(tmp_path / "disk", "40m") as disk:
        if disk is None:
            pytest.skip("needs a tmpfs mount")
        out = disk / "b.h5"
        extract_dataset(sample_dir, out, "tiny", image_size=0, num_workers=0, progress=False, **SPLIT_ARGS)
        (disk / "fill").write_bytes(b"")
        with open(disk / "fill", "wb") as f:  # fill the disk
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
        with contextlib.suppress(Exception):  # what an unguarded attribute rewrite did on that disk
            with h5py.File(out, "r+", rdcc_nbytes=0) as f:
                f.attrs["samcache"] = "x" * 300_000
        with pytest.raises(OSError), h5py.File(out, "r") as f:
            f.attrs["samcache"]  # the attribute is gone: this is the damage to repair
        with EmbeddingStore.open(out) as s:
            assert s.repaired and s.signature["encoder"] == "tiny" and int(s.done.sum()) == 15
        (disk / "fill").unlink()
        with EmbeddingStore.open(out, "r+") as s:
            assert s.repaired
        with EmbeddingStore.open(out) as s:
            assert not s.repaired and s.signature["encoder"] == "tiny"
        assert verify_store(out) == []


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['SAMCACHE_PWNED']}",))


def _plant(path: Path) -> None:
    torch.save({"model": _Payload(), "config": {}, "class_names": [], "store_signature": {}}, path)


def test_no_checkpoint_runs_code_anywhere(tiny_store, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("SAMCACHE_PWNED", str(marker))
    bad = tmp_path / "evil.pt"
    _plant(bad)
    for args in (["eval", "--checkpoint", str(bad)],
                 ["predict", "--checkpoint", str(bad), "--data", str(tiny_store), "--out", str(tmp_path / "p.csv")],
                 ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "x.pth")]):
        result = runner.invoke(slca_train, args)
        assert result.exit_code == 1 and "holds objects that are not tensors or plain values" in result.output, args
    run = tmp_path / "run"
    run.mkdir()
    _plant(run / "last.pt")
    result = runner.invoke(slca_train, ["--cache", str(tiny_store), "--out", str(run), "--resume", "--device", "cpu"])
    assert result.exit_code == 1 and "holds objects that are not tensors" in result.output
    sys.path.insert(0, str(ROOT / "bench"))
    from gate_strength import gate_strength

    shutil.copy(bad, run / "best.pt")
    with pytest.raises(TrainError, match="holds objects"):
        gate_strength(run)
    assert not marker.exists(), "a checkpoint ran its payload"


# --- one bad file does not stop a run -------------------------------------------------------------

def test_bad_images_are_skipped_by_name_and_the_rest_is_stored(sample_dir, tmp_path, monkeypatch):
    from sam_cache import preprocess

    data = tmp_path / "[" / "data"  # the report's paths then hold "[/", rich's closing tag
    shutil.copytree(sample_dir, data)
    Image.fromarray(np.zeros((1, 4000), np.uint8)).save(data / "synthetic-normal" / "strip.png")
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(data / "synthetic-normal" / "huge.png")
    for name in ("[bold]x.png", ":train: y.png", "[i]z.png"):
        (data / "synthetic-smooth" / name).write_text("not an image")
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 80_000)  # huge.png (90,000 pixels) is over; the 224x288 samples not
    result = _extract(data, tmp_path / "s.zarr")
    assert result.exit_code == 3, result.output
    out = " ".join(result.output.split())
    assert "skipped 4 image(s)" in out and "huge.png: image of 300x300 pixels is larger than the limit" in out
    for name in ("[/data/synthetic-smooth/[bold]x.png", ":train: y.png", "[i]z.png"):
        assert name in result.output  # printed literally, not as markup
    with EmbeddingStore.open(tmp_path / "s.zarr") as s:
        assert int(s.done.sum()) == 16 and "synthetic-normal/strip.png" in set(s.ids[s.done])


# --- training does not go ahead on wrong data -----------------------------------------------------

def _cfg(store, out, **kw):
    return TrainConfig.from_dict({"cache": str(store), "out": str(out), "epochs": 1, "batch_size": 4, "img_size": 32,
                                  "device": "cpu", **kw})


def test_an_incomplete_store_is_refused_unless_asked_and_absent_classes_are_named(tiny_store, tmp_path):
    part = tmp_path / "part.zarr"
    shutil.copytree(tiny_store, part)
    import zarr

    with EmbeddingStore.open(part) as s:
        gone = np.flatnonzero((s.splits == "val") & (s.labels == 0))
    zarr.open_array(str(part / "done"), mode="r+")[:] = np.isin(np.arange(15), gone, invert=True)  # as any tool could
    with pytest.raises(TrainError, match=r"is incomplete: 14 of 15 samples are done .* --allow-partial"):
        train(_cfg(part, tmp_path / "r"), log=lambda s: None)
    lines = []
    train(_cfg(part, tmp_path / "r2", allow_partial=True), log=lines.append)
    assert any("no val sample of class synthetic-irregular" in line for line in lines)
    assert any("training on 14 of 15 samples (--allow-partial)" in line for line in lines)


@pytest.mark.parametrize("damage", ["delete images shard", "delete embeddings shard", "truncate", "flip bytes"])
def test_damaged_shards_stop_training_and_verify_names_them(tiny_store, tmp_path, damage):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(tiny_store, bad)
    array = "images" if damage == "delete images shard" else "embeddings"
    shard = bad / array / "c" / "0" / "0" / "0" / "0"
    if damage.startswith("delete"):
        shard.unlink()
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        data = bytearray(shard.read_bytes())
        data[2000] ^= 0xFF
        shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"checksums|cannot be read|checksum"):
        train(_cfg(bad, tmp_path / "r"), log=lambda s: None)
    problems = verify_store(bad)
    assert problems and all("shard 0 (rows 0-15)" in p for p in problems)


# --- clear errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("lr: 1e-3", "lr must be a number; got '1e-3' (YAML reads 1e-3 as text: write 1.0e-3)"),
    ("select_metric: accuracyy", "select_metric must be one of accuracy, balanced_accuracy, macro_f1, auc"),
    ("residency: gpuu", "residency must be one of auto, gpu, host, stream"),
])
def test_a_bad_yaml_config_fails_at_once_in_one_line(tiny_store, tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(f"cache: {tiny_store}\nout: {tmp_path / 'r'}\n{text}\n")
    result = runner.invoke(slca_train, ["--config", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "batch_size must be at least 2"),
    (["--batch-size", "1"], "batch_size must be at least 2"),
    (["--epochs", "0"], "epochs must be at least 1"),
    (["--img-size", "0"], "img_size must be at least 16"),
    (["--backbone-kwargs", "notjson"], "--backbone-kwargs must be JSON"),
    (["--window", "5"], "window must divide 64"),
])
def test_bad_flags_fail_at_once_in_one_line(tiny_store, tmp_path, flags, message):
    result = runner.invoke(slca_train, ["--cache", str(tiny_store), "--out", str(tmp_path / "r"), *flags])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()


def test_read_only_folders_are_one_line(sample_dir, tiny_store, tmp_path):
    with read_only_folder(tmp_path) as ro:
        result = _extract(sample_dir, ro / "s.zarr")
        assert result.exit_code == 1 and "cannot create store" in result.output and "Traceback" not in result.output
        result = runner.invoke(slca_train, ["--cache", str(tiny_store), "--out", str(ro / "run"), "--epochs", "1",
                                            "--img-size", "32", "--device", "cpu"])
        assert result.exit_code == 1 and "cannot create run folder" in result.output


def test_empty_and_text_checkpoints_are_one_line(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello")
    for name, message in (("empty.pt", "is empty"), ("text.pt", "is not a readable torch checkpoint")):
        result = runner.invoke(slca_train, ["eval", "--checkpoint", str(tmp_path / name)])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_a_full_disk_while_saving_a_checkpoint_leaves_no_temporary_file(tiny_store, tmp_path, monkeypatch):
    from trainer import checkpoint

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(TrainError, match=r"cannot write checkpoint .*last\.pt: no space left on device"):
        train(_cfg(tiny_store, tmp_path / "r"), log=lambda s: None)
    assert not list((tmp_path / "r").glob("*.tmp"))


def test_a_store_killed_in_its_first_milliseconds_is_refused_with_a_hint(sample_dir, tmp_path, monkeypatch):
    from sam_cache import store as store_module

    def killed(self, *a, **k):
        raise KeyboardInterrupt  # the process stops right after the group was made

    monkeypatch.setattr(store_module._ZarrBackend, "create_array", killed)
    with pytest.raises(KeyboardInterrupt):
        extract_dataset(sample_dir, tmp_path / "s.zarr", "tiny", image_size=32, num_workers=0, progress=False,
                        **SPLIT_ARGS)
    monkeypatch.undo()
    result = runner.invoke(samcache, ["info", str(tmp_path / "s.zarr")])
    assert result.exit_code == 1 and "creation was interrupted" in " ".join(result.output.split())
    assert "--overwrite" in result.output
    again = _extract(sample_dir, tmp_path / "s.zarr", "--overwrite")
    assert again.exit_code == 0, again.output


def _interrupted_creation(sample_dir, out, monkeypatch, creator):
    """A store stopped while being made, its "creating" marker then set to ``creator``."""
    import zarr

    from sam_cache import store as store_module

    def killed(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module._ZarrBackend, "create_array", killed)
    with pytest.raises(KeyboardInterrupt):
        extract_dataset(sample_dir, out, "tiny", image_size=32, num_workers=0, progress=False, **SPLIT_ARGS)
    monkeypatch.undo()
    zarr.open_group(str(out), mode="r+").attrs["samcache"] = {"creating": creator}


def test_a_store_whose_creator_died_before_any_row_is_created_again(sample_dir, tmp_path, monkeypatch):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid names no process now
    out = tmp_path / "s.zarr"
    _interrupted_creation(sample_dir, out, monkeypatch, {"host": socket.gethostname(), "pid": gone.pid})
    result = _extract(sample_dir, out)
    assert result.exit_code == 0, result.output
    assert "created again" in " ".join(result.output.split())
    with EmbeddingStore.open(out) as s:
        assert s.done.all()


@pytest.mark.parametrize("where", ["this host, alive", "another host"])
def test_a_store_being_created_by_a_live_or_foreign_process_is_refused(sample_dir, tmp_path, monkeypatch, where):
    creator = {"host": socket.gethostname(), "pid": os.getpid()} if where == "this host, alive" \
        else {"host": socket.gethostname() + "-elsewhere", "pid": 2 ** 22 + 1}
    out = tmp_path / "s.zarr"
    _interrupted_creation(sample_dir, out, monkeypatch, creator)
    result = _extract(sample_dir, out)
    text = " ".join(result.output.split())
    assert result.exit_code != 0 and f"being created by process {creator['pid']} on {creator['host']}" in text
    assert EmbeddingStore.is_store(out)  # refused, not deleted


# --- kills and concurrency ------------------------------------------------------------------------

def _rows(path):
    with EmbeddingStore.open(path) as s:
        return s.read_embeddings(0, len(s))


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(sample_dir, tiny_store, tmp_path):
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "cli.samcache", *EXTRACT[:4], "64", *EXTRACT[5:], "--batch-size", "2",
           "--dataset", str(sample_dir), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 6.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    final = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert kills >= 1
    np.testing.assert_array_equal(_rows(out), _rows(tiny_store))
    assert verify_store(out) == []


@pytest.mark.slow
def test_a_concurrent_reader_sees_only_complete_rows(sample_dir, tmp_path):
    out = tmp_path / "s.zarr"
    cmd = [sys.executable, "-m", "cli.samcache", *EXTRACT, "--batch-size", "1", "--dataset", str(sample_dir),
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    seen = 0
    try:
        while proc.poll() is None:
            try:
                with EmbeddingStore.open(out) as s:
                    done = np.flatnonzero(s.done)
                    if len(done):
                        rows = s.read_rows(done)  # checksums verified: a half-written row would raise
                        assert np.isfinite(rows).all() and (np.abs(rows).reshape(len(done), -1).max(1) > 0).all()
                        seen = max(seen, len(done))
            except StoreError as exc:
                if "does not exist" not in str(exc) and "is being created" not in str(exc):
                    raise
            time.sleep(0.05)
    finally:
        proc.wait()
    assert proc.returncode == 0 and seen >= 1


def test_more_shots_than_a_class_has_is_said(tiny_store, tmp_path):
    lines = []
    train(_cfg(tiny_store, tmp_path / "r", shots=100), log=lines.append)
    assert any("fewer than 100 train samples in" in line and "all of them are used" in line for line in lines)


def test_a_locked_hdf5_store_names_the_lock_not_overwrite(sample_dir, tmp_path):
    pytest.importorskip("h5py")
    out = tmp_path / "s.h5"
    assert _extract(sample_dir, out).exit_code == 0
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, time; f = h5py.File({str(out)!r}, 'r+'); "
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        result = _extract(sample_dir, out)
        assert result.exit_code == 1 and "locked by another process" in result.output
        assert "--overwrite" not in result.output
    finally:
        holder.kill()
        holder.wait()
