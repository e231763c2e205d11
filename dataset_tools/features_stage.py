"""Build (or reuse) the text and image feature tables of one dataset folder.

A table is reused when ``recbole_fmrl.data.features.read_modality`` accepts it (aligned with the
current ``.item_ids``, right shape) *and* its manifest entry records the same encoder key and
the same inputs (sha256 of the texts / of the image bytes). Anything else is rebuilt.
"""
import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from recbole_fmrl.data import features

from dataset_tools.encoders import (ImageEncoder, ImageEncoderOptions, TextEncoder, TextEncoderOptions,
                                    image_encoder_key, text_encoder_key)

log = logging.getLogger(__name__)


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


def ensure_text_features(folder, name: str, texts: List[str], options: TextEncoderOptions,
                         extra: Optional[dict] = None, progress: bool = True,
                         encoder: Optional[TextEncoder] = None) -> dict:
    """Encode ``texts`` (row order = ``<name>.item_ids``) unless an identical table exists."""
    key = text_encoder_key(options)
    inputs = texts_sha256(texts)
    meta = _reusable(folder, name, "text", key, inputs)
    if meta is not None:
        log.info("text features of %s are up to date (%s), skipping", name, meta["encoder"])
        return dict(meta, skipped=True)
    enc = encoder or TextEncoder(options)
    array = enc.encode(texts, progress=progress)
    entry = features.write_modality(
        folder, name, "text", array, encoder=enc.label(), normalized=True,
        extra={"encoder_key": key, "inputs_sha256": inputs, "pooling": enc.pooling,
               "max_length": enc.max_length, **(extra or {})})
    return dict(entry, skipped=False)


def images_sha256(digests: List[Optional[str]]) -> str:
    digest = hashlib.sha256()
    for d in digests:
        digest.update((d or "-").encode())
        digest.update(b"\0")
    return digest.hexdigest()


def ensure_image_features(folder, name: str, paths: List[Optional[Path]], digests: List[Optional[str]],
                          options: ImageEncoderOptions, extra: Optional[dict] = None,
                          progress: bool = True, on_error: Optional[Callable] = None) -> dict:
    """Encode the images of each row (None: no usable image -> zero row, mask False)."""
    key = image_encoder_key(options)
    inputs = images_sha256(digests)
    meta = _reusable(folder, name, "image", key, inputs)
    if meta is not None:
        log.info("image features of %s are up to date (%s), skipping", name, meta["encoder"])
        return dict(meta, skipped=True)
    enc = ImageEncoder(options)
    rows = [r for r, p in enumerate(paths) if p is not None]
    array = np.zeros((len(paths), enc.dim), dtype=np.float32)
    mask = np.zeros(len(paths), dtype=bool)

    def row_error(i, err):
        if on_error:
            on_error(rows[i], err)

    if rows:
        sub, sub_mask = enc.encode([paths[r] for r in rows], progress=progress, on_error=row_error)
        array[rows] = sub
        mask[rows] = sub_mask
    # A mask file only when some row is a placeholder: the common case stays a single table.
    entry = features.write_modality(
        folder, name, "image", array, encoder=enc.label(), normalized=True,
        mask=None if mask.all() else mask,
        extra={"encoder_key": key, "inputs_sha256": inputs, "rows_with_image": int(mask.sum()),
               **(extra or {})})
    return dict(entry, skipped=False)
