"""Encode items into the text and image feature tables of one dataset folder (or reuse them).

A table is reused when ``recbole_fmrl.data.features.read_modality`` accepts it (aligned with the
current ``.item_ids``, right shape) *and* its manifest entry records the same encoder key and
the same inputs (sha256 of the texts / of the image bytes). Anything else is rebuilt.

Rebuilding encodes in chunks of rows; each finished chunk is written atomically to
``<folder>/.encode-cache/<name>.<modality>.<hash of encoder key + inputs>/``, so a run killed
during encoding resumes from the chunks already written. The cache folder is removed once the
table is written.
"""
import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
from tqdm.auto import tqdm

from dataset_tools.encoders import (
    ImageEncoder,
    ImageEncoderOptions,
    TextEncoder,
    TextEncoderOptions,
    image_encoder_key,
    text_encoder_key,
)
from recbole_fmrl import atomic_write
from recbole_fmrl.data import features

log = logging.getLogger(__name__)

CHUNK_ROWS = 1024  # rows per cached chunk: a kill loses at most this much encoding work
CACHE_DIR = ".encode-cache"


def chunk_cache_dir(folder, name: str, modality: str, key: dict, inputs: str) -> Path:
    """Where the chunks of one (encoder key, inputs) pair live; another encoder or input, another folder."""
    blob = json.dumps({"key": key, "inputs": inputs}, sort_keys=True, default=str).encode()
    return Path(folder) / CACHE_DIR / f"{name}.{modality}.{hashlib.sha256(blob).hexdigest()[:20]}"


def _load_chunk(path: Path, n_rows: int) -> Optional[Dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as err:  # unreadable: encode the chunk again
        log.warning("%s: unreadable cached chunk, encoding it again (%s)", path, err)
        return None
    if not arrays or any(len(a) != n_rows for a in arrays.values()):
        return None
    return arrays


def encode_in_chunks(cache: Path, n_rows: int, encode: Callable[[int, int], Dict[str, np.ndarray]],
                     chunk_rows: int = CHUNK_ROWS, progress: bool = True, desc: str = "encoding") -> dict:
    """``encode(start, end)`` -> arrays of ``end - start`` rows, per chunk, cached; concatenated arrays."""
    parts: List[Dict[str, np.ndarray]] = []
    reused = 0
    bar = tqdm(total=n_rows, desc=desc, unit="item", disable=not progress)
    for start in range(0, n_rows, max(1, chunk_rows)):
        end = min(n_rows, start + chunk_rows)
        path = cache / f"rows-{start:09d}-{end:09d}.npz"
        arrays = _load_chunk(path, end - start) if path.is_file() else None
        if arrays is None:
            arrays = encode(start, end)
            with atomic_write.atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)
        else:
            reused += end - start
        parts.append(arrays)
        bar.update(end - start)
    bar.close()
    if reused:
        log.info("%s: %d of %d rows reused from cached chunks", cache.name, reused, n_rows)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def drop_chunk_cache(cache: Path):
    shutil.rmtree(cache, ignore_errors=True)
    with contextlib.suppress(OSError):
        cache.parent.rmdir()  # only when no other table's chunks are left


def length_order(texts: List[str]) -> List[int]:
    """Rows longest first, ties in row order: the order ``TextEncoder.encode`` batches in."""
    return sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)


def texts_sha256(texts: List[str]) -> str:
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def _reusable(folder, name, modality, key: dict, inputs: str) -> Optional[dict]:
    try:
        table = features.read_modality(folder, name, modality)
    except features.FeatureFileError:
        return None
    meta = table.meta
    if meta.get("encoder_key") != json.loads(json.dumps(key)) or meta.get("inputs_sha256") != inputs:
        return None
    return meta


def _up_to_date(folder, name: str, modality: str, key: dict, inputs: str) -> Optional[dict]:
    """The existing table's metadata (marked ``skipped``) when it was built from the same inputs and encoder."""
    meta = _reusable(folder, name, modality, key, inputs)
    if meta is None:
        return None
    log.info("%s features of %s are up to date (%s), skipping", modality, name, meta["encoder"])
    return dict(meta, skipped=True)


def ensure_text_features(folder, name: str, texts: List[str], options: TextEncoderOptions,
                         extra: Optional[dict] = None, progress: bool = True,
                         encoder: Optional[TextEncoder] = None, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Encode ``texts`` (row order = ``<name>.item_ids``) unless an identical table exists."""
    key = text_encoder_key(options)
    inputs = texts_sha256(texts)
    done = _up_to_date(folder, name, "text", key, inputs)
    if done is not None:
        return done
    enc = encoder or TextEncoder(options)
    batch = max(1, options.batch_size)
    cache = chunk_cache_dir(folder, name, "text", dict(key, batch_size=batch), inputs)
    # Chunks follow the encoder's own longest-first order and hold whole batches, so every batch
    # (and its padding) is the one a single unchunked call would form: the table is bit-identical.
    order = length_order(texts)
    chunk_rows = max(batch, chunk_rows // batch * batch)

    def encode(start, end):
        return {"features": enc.encode([texts[i] for i in order[start:end]], progress=False)}

    array = np.zeros((len(texts), enc.dim), dtype=np.float32)
    if texts:
        array[order] = encode_in_chunks(cache, len(texts), encode, chunk_rows, progress,
                                        "encoding text")["features"]
    entry = features.write_modality(
        folder, name, "text", array, encoder=enc.label(), normalized=True,
        extra={"encoder_key": key, "inputs_sha256": inputs, "pooling": enc.pooling,
               "max_length": enc.max_length, **(extra or {})})
    drop_chunk_cache(cache)
    return dict(entry, skipped=False)


def images_sha256(digests: List[Optional[str]]) -> str:
    digest = hashlib.sha256()
    for d in digests:
        digest.update((d or "-").encode())
        digest.update(b"\0")
    return digest.hexdigest()


def ensure_image_features(folder, name: str, paths: List[Optional[Path]], digests: List[Optional[str]],
                          options: ImageEncoderOptions, extra: Optional[dict] = None,
                          progress: bool = True, on_error: Optional[Callable] = None,
                          chunk_rows: int = CHUNK_ROWS) -> dict:
    """Encode the images of each row (None: no usable image -> zero row, mask False)."""
    key = image_encoder_key(options)
    inputs = images_sha256(digests)
    done = _up_to_date(folder, name, "image", key, inputs)
    if done is not None:
        return done
    enc = ImageEncoder(options)
    rows = [r for r, p in enumerate(paths) if p is not None]
    cache = chunk_cache_dir(folder, name, "image", key, inputs)
    array = np.zeros((len(paths), enc.dim), dtype=np.float32)
    mask = np.zeros(len(paths), dtype=bool)
    if rows:
        sub = _encode_image_rows(enc, [paths[r] for r in rows], cache, chunk_rows, progress)
        array[rows] = sub["features"]
        mask[rows] = sub["mask"]
        for i in np.flatnonzero(~sub["mask"]):
            if on_error:  # also for chunks reused from the cache, so the report is the same
                on_error(rows[i], str(sub["errors"][i]))
    # A mask file only when some row is a placeholder: the common case stays a single table.
    entry = features.write_modality(
        folder, name, "image", array, encoder=enc.label(), normalized=True,
        mask=None if mask.all() else mask,
        extra={"encoder_key": key, "inputs_sha256": inputs, "rows_with_image": int(mask.sum()),
               **(extra or {})})
    drop_chunk_cache(cache)
    return dict(entry, skipped=False)


def _encode_image_rows(enc: ImageEncoder, paths: List[Path], cache: Path, chunk_rows: int,
                       progress: bool) -> Dict[str, np.ndarray]:
    """Features, decode mask and error text of ``paths``, chunk by chunk through the cache."""
    def encode(start, end):
        errors = [""] * (end - start)

        def row_error(i, err):
            errors[i] = str(err)

        sub, sub_mask = enc.encode(paths[start:end], progress=False, on_error=row_error)
        return {"features": sub, "mask": sub_mask, "errors": np.array(errors, dtype=str)}

    return encode_in_chunks(cache, len(paths), encode, chunk_rows, progress, "encoding images")
