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
        assert result.exit_code == 1 and "holds a Python object (" in result.output, args
    run = tmp_path / "run"
    run.mkdir()
    _plant(run / "last.pt")
    result = runner.invoke(slca_train, ["--cache", str(tiny_store), "--out", str(run), "--resume", "--device", "cpu"])
    assert result.exit_code == 1 and "holds a Python object (" in result.output
    sys.path.insert(0, str(ROOT / "bench"))
    from gate_strength import gate_strength

    shutil.copy(bad, run / "best.pt")
    with pytest.raises(TrainError, match=r"holds a Python object \("):
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
    return TrainConfig.from_dict({"cache": str(store), "out": str(out), "backbone": "resnet18", "epochs": 1, "batch_size": 4,
                                  "img_size": 32, "device": "cpu", **kw})


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
    ("lr: fast", "lr must be a number; got 'fast'"),
    ("select_metric: accuracyy", "select_metric must be one of accuracy, balanced_accuracy, macro_f1, auc"),
    ("residency: gpuu", "residency must be one of auto, gpu, host, stream"),
])
def test_a_bad_yaml_config_fails_at_once_in_one_line(tiny_store, tmp_path, text, message):
    (tmp_path / "c.yaml").write_text(f"cache: {tiny_store}\nout: {tmp_path / 'r'}\n{text}\n")
    result = runner.invoke(slca_train, ["--config", str(tmp_path / "c.yaml")])
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()


def test_a_yaml_lr_written_1e_3_is_the_number_it_means(tmp_path):
    """Issue 25: YAML 1.1 reads `lr: 1e-3` as the text '1e-3'; it was refused, though users write it so."""
    from trainer.config import TrainConfig

    (tmp_path / "c.yaml").write_text("cache: s.zarr\nout: r\nlr: 1e-3\nweight_decay: 5E-2\n")
    cfg = TrainConfig.load(tmp_path / "c.yaml")
    assert cfg.lr == 1e-3 and cfg.weight_decay == 0.05


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
    for name, message in (("empty.pt", "is empty"), ("text.pt", "is not a torch file")):
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
    assert not list((tmp_path / "r").glob("*.tmp*"))


def test_a_store_killed_in_its_first_milliseconds_is_refused_with_a_hint(sample_dir, tmp_path, monkeypatch):
    from sam_cache.store import backends

    def killed(self, *a, **k):
        raise KeyboardInterrupt  # the process stops right after the group was made

    monkeypatch.setattr(backends.ZarrBackend, "create_array", killed)
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

    from sam_cache.store import backends

    def killed(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(backends.ZarrBackend, "create_array", killed)
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


def test_a_store_in_its_first_instant_is_said_to_be_created_not_foreign(tmp_path):
    # zarr makes the folder, then renames a *.partial file to zarr.json: a reader can see either
    born = tmp_path / "new.zarr"
    born.mkdir()
    with pytest.raises(StoreError, match="is being created"):
        EmbeddingStore.open(born)
    (born / "zarr.0f3a.partial").write_bytes(b'{"zarr_for')
    with pytest.raises(StoreError, match="is being created"):
        EmbeddingStore.open(born)
    (born / "notes.txt").write_text("mine")  # anything else: a folder of the user's
    with pytest.raises(StoreError, match="exists and is not a samcache store"):
        EmbeddingStore.open(born)


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


# --- issue 21, round two: outputs never overwrite inputs or the user's files -------------------------

@pytest.fixture(scope="module")
def tiny_run(tiny_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    train(_cfg(tiny_store, out), log=lambda s: None)
    return out


def test_export_and_predict_refuse_to_write_over_their_inputs(tiny_run, tiny_store, tmp_path):
    """Issue 21.3: export --out run/best.pt replaced the checkpoint; predict --out labels.csv the manifest."""
    ckpt = tmp_path / "best.pt"
    shutil.copy(tiny_run / "best.pt", ckpt)
    before = ckpt.read_bytes()
    result = runner.invoke(slca_train, ["export", "--checkpoint", str(ckpt), "--out", str(ckpt)])
    assert result.exit_code == 1 and "would overwrite the input --checkpoint" in result.output, result.output
    assert ckpt.read_bytes() == before
    data = tmp_path / "c"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(data / f"{i}.png")
    manifest = data / "labels.csv"
    manifest.write_text("path\n0.png\n1.png\n")
    text = manifest.read_text()
    result = runner.invoke(slca_train, ["predict", "--checkpoint", str(ckpt), "--data", str(manifest),
                                        "--out", str(manifest)])
    assert result.exit_code == 1 and "would overwrite the input --data" in result.output, result.output
    assert manifest.read_text() == text
    # an existing output is replaced only when asked, and nothing half-written is ever left
    preds = tmp_path / "p.csv"
    preds.write_text("mine")
    args = ["predict", "--checkpoint", str(ckpt), "--data", str(tiny_store), "--out", str(preds)]
    result = runner.invoke(slca_train, args)
    assert result.exit_code == 1 and "is not a predictions file" in result.output and preds.read_text() == "mine"
    assert runner.invoke(slca_train, args + ["--overwrite"]).exit_code == 0
    assert preds.read_text().startswith("id,source,")


def test_a_run_folder_with_the_users_files_or_inside_the_dataset_is_refused(tiny_store, sample_dir, tmp_path):
    """Issue 21.3: a user's config.yaml was overwritten; a run folder inside a class folder became images."""
    p = tmp_path / "p"
    p.mkdir()
    (p / "config.yaml").write_text("notes\n")
    with pytest.raises(TrainError, match=r"holds files that slca-train did not write \(config\.yaml\)"):
        train(_cfg(tiny_store, p), log=lambda s: None)
    assert (p / "config.yaml").read_text() == "notes\n"
    inside = Path(EmbeddingStore.open(tiny_store).meta["dataset"]["root"]) / "synthetic-normal" / "run"
    with pytest.raises(TrainError, match="lies inside the dataset"):
        train(_cfg(tiny_store, inside), log=lambda s: None)
    assert not inside.exists()
    with pytest.raises(TrainError, match="would overwrite the input --cache"):
        train(_cfg(tiny_store, tiny_store), log=lambda s: None)


def test_samcache_export_names_the_file_it_writes_and_leaves_nothing_half_written(tiny_store, tmp_path, monkeypatch):
    """Issue 21.11 and 13: export said "wrote ... to feats" and wrote feats.npz; a full disk left an empty file."""
    result = runner.invoke(samcache, ["export", str(tiny_store), "--out", str(tmp_path / "feats")])
    assert result.exit_code == 0 and f"to {tmp_path / 'feats.npz'} " in result.output
    assert (tmp_path / "feats.npz").is_file()

    def full(file, **arrays):
        Path(file).write_bytes(b"")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    result = runner.invoke(samcache, ["export", str(tiny_store), "--out", str(tmp_path / "g.npz")])
    assert result.exit_code == 1 and "cannot write" in result.output and "no space left on device" in result.output
    assert "Traceback" not in result.output and not list(tmp_path.glob("*g*"))


def test_a_sweep_space_cannot_aim_trials_at_another_folder(tmp_path):
    """Issue 21.4: base: {out: victim} trained every trial into victim/ with overwrite forced on."""
    from trainer import ConfigError
    from trainer.sweep import SweepSpace, load_space

    for key, value in (("out", str(tmp_path / "victim")), ("cache", "other.zarr"), ("overwrite", True)):
        with pytest.raises(ConfigError, match=f"a space file cannot set {key}"):
            SweepSpace({"base": {key: value, "epochs": 1}, "params": {"lr": [1e-3]}})
    bad = tmp_path / "s.yaml"
    bad.write_text("base: !!python/object/apply:os.system ['true']\nparams: {lr: [0.1]}\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_space(bad)


def test_a_sweep_rerun_with_another_space_is_refused_not_mixed(tiny_store, tmp_path):
    """Issue 21.6: a rerun with another space kept the old trials and ran nothing."""
    from trainer.sweep import SweepSpace, run_sweep

    base = {"epochs": 1, "img_size": 32, "batch_size": 4, "residency": "host"}
    run_sweep(tiny_store, SweepSpace({"base": base, "params": {"lr": [1e-3]}}), tmp_path / "sw", device="cpu",
              log=lambda s: None)
    with pytest.raises(TrainError, match=r"run with another space or store \(space params differ\)"):
        run_sweep(tiny_store, SweepSpace({"base": base, "params": {"lr": [0.05]}}), tmp_path / "sw", device="cpu",
                  log=lambda s: None)
    again = run_sweep(tiny_store, SweepSpace({"base": base, "params": {"lr": [1e-3]}}), tmp_path / "sw",
                      device="cpu", log=lambda s: None)
    assert len(again["trials"]) == 1


def test_resume_refuses_another_store_and_accepts_the_run_folder_written_another_way(tiny_store, sample_dir,
                                                                                      tmp_path, monkeypatch):
    """Issue 21.5 and 13: resume trained on a replaced store; /abs/run vs ./run was "a recipe change"."""
    store = tmp_path / "st.zarr"
    shutil.copytree(tiny_store, store)
    train(_cfg(store, tmp_path / "run"), log=lambda s: None)
    monkeypatch.chdir(tmp_path)
    # the same run folder and store, written relative: it resumes
    train(_cfg("./st.zarr", "./run", epochs=2), resume=True, log=lambda s: None)
    shutil.rmtree(store)  # replaced by an extraction of other data (another split seed: another manifest)
    extract_dataset(sample_dir, store, "tiny", image_size=64, num_workers=0, progress=False, seed=5, **SPLIT_ARGS)
    with pytest.raises(TrainError, match=r"(?s)not the one the run started on .*manifest_sha256"):
        train(_cfg(store, tmp_path / "run", epochs=3), resume=True, log=lambda s: None)


def test_eval_predict_and_export_refuse_an_incomplete_store_by_count(tiny_run, tiny_store, tmp_path):
    """Issue 21.8: with done[6:] False, predict wrote 6 rows and eval and export used 6, silently."""
    import zarr

    part = tmp_path / "part.zarr"
    shutil.copytree(tiny_store, part)
    done = zarr.open_group(str(part), mode="r+")["done"]
    done[6:] = False
    ckpt = str(tiny_run / "best.pt")
    cases = (
        (slca_train, ["eval", "--checkpoint", ckpt, "--cache", str(part), "--split", "all"]),
        (slca_train, ["predict", "--checkpoint", ckpt, "--data", str(part), "--out", str(tmp_path / "p.csv")]),
        (samcache, ["export", str(part), "--out", str(tmp_path / "f.npz")]),
    )
    for app, args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "is incomplete: 6 of 15 samples are done" in result.output, result.output
        assert runner.invoke(app, args + ["--allow-partial"]).exit_code == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 7


def test_damaged_masks_are_found_by_verify_and_stop_focus_training(tiny_store, tmp_path):
    """Issue 21.7: a deleted and an overwritten mask shard passed verify, and focus trained on them."""
    from sam_cache.masks import decode_masks

    store = tmp_path / "m.zarr"
    shutil.copytree(tiny_store, store)
    decode_masks(store, prompt="box", progress=False)
    assert verify_store(store) == []
    shard0 = store / "masks" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard0.read_bytes())
    data[100:5100] = bytes(255 - b for b in data[100:5100])
    shard0.write_bytes(bytes(data))
    problems = verify_store(store)
    assert any("masks" in p and "do not match their checksums" in p for p in problems), problems
    with pytest.raises(StoreError, match="masks of .* do not match their checksums"):
        train(_cfg(store, tmp_path / "run", focus="background", slca=False, fuse="none"), log=lambda s: None)


def _writing_commands(dataset, store, ckpt, out, space):
    """Every command that writes, with all of its outputs under ``out`` (``store`` may be there too)."""
    return {
        "extract": (samcache, [*EXTRACT, "--dataset", str(dataset), "--out", str(out / "e.zarr")]),
        "masks": (samcache, ["masks", str(store), "--prompt", "box", "--no-progress"]),
        "convert": (samcache, ["convert", str(store), "--out", str(out / "c.zarr"), "--dtype", "int8", "--no-progress"]),
        "samcache export": (samcache, ["export", str(store), "--out", str(out / "f.npz")]),
        "train": (slca_train, ["--cache", str(store), "--out", str(out / "run"), "--epochs", "1", "--img-size", "32",
                               "--batch-size", "4", "--device", "cpu"]),
        "predict": (slca_train, ["predict", "--checkpoint", str(ckpt), "--data", str(store), "--out", str(out / "p.csv")]),
        "export": (slca_train, ["export", "--checkpoint", str(ckpt), "--out", str(out / "x.pth")]),
        "sweep": (slca_train, ["sweep", "--cache", str(store), "--space", str(space), "--out", str(out / "sw")]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("disk", ["read-only", "full"])
def test_every_writing_command_fails_in_one_line_and_leaves_nothing_half_written(tiny_run, tiny_store, sample_dir,
                                                                                 tmp_path, disk):
    """Issue 21.10 and 21.11: read-only destinations and full disks gave tracebacks and empty files."""
    space = tmp_path / "space.yaml"
    space.write_text("base: {epochs: 1, img_size: 32, batch_size: 4}\nparams: {lr: [0.001]}\n")
    with tmpfs(tmp_path / "d", "40m") as d:
        if d is None:
            pytest.skip("needs a tmpfs mount")
        shutil.copytree(tiny_store, d / "s.zarr")  # 30 MiB: masks write into the store itself
        shutil.copy(tiny_run / "best.pt", tmp_path / "best.pt")
        if disk == "read-only":
            subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        else:
            with open(d / "fill", "wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
        before = {p.relative_to(d) for p in d.rglob("*")}
        failed = []
        for name, (app, args) in _writing_commands(sample_dir, d / "s.zarr", tmp_path / "best.pt", d, space).items():
            result = runner.invoke(app, args)
            text = result.output
            if result.exit_code != 1 or "Traceback" in text or len([ln for ln in text.splitlines()
                                                                      if ln.startswith("error:")]) != 1:
                failed.append(f"{name}: exit {result.exit_code}: {text[-400:]!r} {result.exception!r}")
        assert not failed, "\n".join(failed)
        # nothing half-written: no new file that is empty or a temporary one
        new = [p for p in d.rglob("*") if p.relative_to(d) not in before and p.is_file()]
        assert not [p for p in new if p.stat().st_size == 0 or ".tmp" in p.name], new


def test_edited_store_attributes_are_refused_by_every_reader(tiny_store, tmp_path):
    """Issue 21.9 and 21.12: dtype edited to bfloat16 gave 91 % NaN features; to int8 a KeyError; an edited
    encoder field passed eval."""
    import zarr

    for field, value, message in (("dtype", "bfloat16", "dtype attribute says 'bfloat16'"),
                                  ("dtype", "int8", "dtype attribute says 'int8'"),
                                  ("encoder", "vit_h", "signature attributes .* were changed")):
        store = tmp_path / f"{field}-{value}.zarr"
        shutil.copytree(tiny_store, store)
        root = zarr.open_group(str(store), mode="r+")
        meta = dict(root.attrs["samcache"])
        meta[field] = value
        if field == "dtype":
            meta.pop("signature_sha256")  # a careful editor: only the dtype check is left to catch it
        root.attrs["samcache"] = meta
        for app, args in ((samcache, ["export", str(store), "--out", str(tmp_path / "f.npz")]),
                          (samcache, ["masks", str(store), "--prompt", "box", "--no-progress"]),
                          (slca_train, ["--cache", str(store), "--out", str(tmp_path / "r"), "--epochs", "1"])):
            result = runner.invoke(app, args)
            assert result.exit_code == 1 and "Traceback" not in result.output, result.output
            assert __import__("re").search(message, result.output), result.output


def test_a_second_creator_never_deletes_the_first_ones_store(tiny_store, sample_dir, tmp_path, monkeypatch):
    """Issue 21.12: two extractions started together into one new store: one died with KeyError 'valid'
    (mode "w" let the second wipe what the first had made)."""
    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    monkeypatch.setattr(EmbeddingStore, "exists", staticmethod(lambda path: False))  # both saw no store
    with pytest.raises(StoreError, match="was created by another process just now"):
        extract_dataset(sample_dir, store, "tiny", image_size=64, num_workers=0, progress=False, **SPLIT_ARGS)
    monkeypatch.undo()
    assert verify_store(store) == [] and EmbeddingStore.open(store).done.all()


def test_a_store_being_written_is_refused_to_a_second_writer_and_freed_by_a_kill(tiny_store, sample_dir, tmp_path):
    """Two extractions into one existing store (a resume beside a running one, or --overwrite under
    it) were not kept apart: --overwrite deleted the rows of a live run. A running job holds the store
    (extract) or its mask set (masks-SET); a second is refused, names the holder, and changes nothing;
    a SIGKILL of the holder frees the store at once, and the rerun resumes."""
    from sam_cache.user_masks import import_masks

    store = tmp_path / "s.zarr"
    shutil.copytree(tiny_store, store)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom sam_cache import EmbeddingStore\n"
         "with EmbeddingStore.writer_lock(sys.argv[1], 'extract'), EmbeddingStore.writer_lock(sys.argv[1], 'masks-gt'):\n"
         "    print('held', flush=True)\n    time.sleep(600)\n", str(store)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        for overwrite in (True, False):
            with pytest.raises(StoreError, match=f"is being extracted by pid {holder.pid} on "):
                extract_dataset(sample_dir, store, "tiny", image_size=64, num_workers=0, progress=False,
                                overwrite=overwrite, **SPLIT_ARGS)
        with pytest.raises(StoreError, match=r"is being written \(masks-gt\) by pid"):
            import_masks(store, str(sample_dir), mask_set="gt", progress=False)
        assert verify_store(store) == [] and EmbeddingStore.open(store).done.all()
        assert "gt" not in EmbeddingStore.open(store).mask_sets
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (store / ".samcache.extract.lock").exists()  # a killed holder leaves its file, not its lock
    result = extract_dataset(sample_dir, store, "tiny", image_size=64, num_workers=0, progress=False, **SPLIT_ARGS)
    assert result.written == 0 and result.already_done == len(EmbeddingStore.open(store))
    assert not (store / ".samcache.extract.lock").exists()  # the rerun took it over and removed it


def test_tampered_checkpoints_are_refused_in_one_line(tiny_run, tmp_path):
    """Issue 21.12: a class more or fewer, another backbone, a string store_signature, img_size 100000."""
    state = torch.load(tiny_run / "best.pt", weights_only=True)
    cases = {
        "class more": dict(state, class_names=state["class_names"] + ["extra"]),
        "class fewer": dict(state, class_names=state["class_names"][:2]),
        "backbone": dict(state, config={**state["config"], "backbone": "resnet10t"}),
        "signature": dict(state, store_signature="x"),
        "img_size": dict(state, config={**state["config"], "img_size": 100000}),
    }
    for name, bad in cases.items():
        path = tmp_path / f"{name}.pt"
        torch.save(bad, path)
        result = runner.invoke(slca_train, ["eval", "--checkpoint", str(path)])
        assert result.exit_code == 1 and "Traceback" not in result.output, (name, result.output, result.exception)
        assert "error:" in result.output, (name, result.output)


def test_predict_scores_data_with_a_class_the_model_lacks(tiny_run, sample_dir, tmp_path):
    """Issue 21.12: IndexError: Target 3 is out of bounds, and no CSV."""
    data = tmp_path / "data"
    shutil.copytree(sample_dir, data)
    shutil.copytree(data / "synthetic-normal", data / "synthetic-unseen")
    result = runner.invoke(slca_train, ["predict", "--checkpoint", str(tiny_run / "best.pt"), "--data", str(data),
                                        "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, (result.output, result.exception)
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 21


def test_sweep_space_problems_are_found_before_any_trial(tiny_store, tmp_path):
    """Issue 21.12: an optuna window range failed in trial 1; a markup store path crashed the table."""
    pytest.importorskip("optuna")
    from trainer import ConfigError
    from trainer.sweep import SweepSpace

    with pytest.raises(ConfigError, match="window must divide 64, got 3"):
        SweepSpace({"method": "optuna", "trials": 2, "params": {"window": {"low": 3, "high": 5}}})
    odd = tmp_path / "m[" / "x.zarr"
    shutil.copytree(tiny_store, odd)
    (tmp_path / "s.yaml").write_text("base: {epochs: 1, img_size: 32, batch_size: 4}\nparams: {lr: [0.001]}\n")
    result = runner.invoke(slca_train, ["sweep", "--cache", str(odd), "--space", str(tmp_path / "s.yaml"),
                                        "--out", str(tmp_path / "sw"), "--device", "cpu"])
    assert result.exit_code == 0, (result.output, result.exception)


def test_bad_boxes_are_refused_before_the_masks_signature_is_recorded(tiny_store, tmp_path):
    """Issue 21.9: NaN boxes were accepted; a failed CSV left a signature that refused the corrected rerun."""
    from sam_cache.masks import decode_masks

    store = tmp_path / "m.zarr"
    shutil.copytree(tiny_store, store)
    ids = EmbeddingStore.open(store).ids
    boxes = tmp_path / "b.csv"
    boxes.write_text("id,x0,y0,x1,y1\n" + f"{ids[0]},nan,0,10,10\n")
    with pytest.raises(Exception, match=r"line 2: the box .* must be finite"):
        decode_masks(store, prompt="csv", boxes=boxes, progress=False)
    assert not EmbeddingStore.open(store).mask_set().exists  # nothing recorded
    boxes.write_text("id,x0,y0,x1,y1\n" + f"{ids[0]},0,0,10,10\n")
    assert decode_masks(store, prompt="csv", boxes=boxes, progress=False)["written"] == 15


def test_an_extraction_into_a_split_dataset_folder_is_refused(sample_dir, tmp_path):
    """Issue 21.13: --out inside a train/+test/ dataset broke the dataset for the next run."""
    data = tmp_path / "sl"
    for split in ("train", "test"):
        shutil.copytree(sample_dir, data / split)
    result = _extract(data, data / "emb.zarr")
    assert result.exit_code == 1 and "lies inside the dataset folder" in result.output, result.output
    assert not (data / "emb.zarr").exists()
