"""Opening item images robustly: every image reaches the encoder as 3-channel RGB or is reported.

Images are checked once before the k-core pass (so the ``drop`` policy can remove items whose
image is missing or unreadable before counting) and opened again, batch by batch, when encoded:
never all in memory at once.
"""
import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm.auto import tqdm

from dataset_tools.report import Report

# Truncated files must fail loudly instead of decoding to grey bands.
ImageFile.LOAD_TRUNCATED_IMAGES = False
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


class ImageReadError(ValueError):
    """The file exists but is not a decodable image."""


def to_rgb(img: Image.Image) -> Tuple[Image.Image, Optional[str]]:
    """Convert any PIL mode to RGB; returns the image and the original mode when it changed.

    Transparent pixels are composited on white: a plain ``convert("RGB")`` turns them black,
    and product photos with alpha are cut-outs meant to sit on a white page.
    """
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background, mode
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than clip everything above 255 to white.
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB"), mode


def open_rgb(path) -> Tuple[Image.Image, Optional[str]]:
    """Fully decode ``path`` as RGB; ``ImageReadError`` with the reason when that fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(f"{type(err).__name__}: {err}") from err


def find_image(folder: Path, stems: List[str]) -> Optional[Path]:
    """First existing ``folder/<stem><suffix>`` (or ``folder/<stem>`` when it has a suffix)."""
    for stem in stems:
        if not stem:
            continue
        direct = folder / stem
        if Path(stem).suffix.lower() in IMAGE_SUFFIXES and direct.is_file():
            return direct
        for suffix in IMAGE_SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


@dataclass
class ImageCheck:
    ok: Dict[str, bool]  # item token -> the image decodes
    sha256: Dict[str, str]  # item token -> sha256 of the image bytes (readable images only)


def check_images(tokens: List[str], item_info, report: Report, progress: bool = True) -> ImageCheck:
    """Decode each item's image once; report missing/corrupt ones and mode conversions."""
    ok, digests = {}, {}
    for token in tqdm(tokens, desc="checking images", unit="img", disable=not progress):
        item = item_info[token]
        if item.image is None or not Path(item.image).is_file():
            shown = item.image if item.image is not None else "(no image reference)"
            report.problem("missing image", item.image_origin or item.origin, None,
                           f"item {token}: {shown}")
            ok[token] = False
            continue
        try:
            _, mode = open_rgb(item.image)
        except ImageReadError as err:
            report.problem("corrupt image", item.image, None, f"item {token}: {err}")
            ok[token] = False
            continue
        if mode is not None:
            report.repair(f"image converted from mode {mode} to RGB", item.image, None, f"item {token}")
        ok[token] = True
        digests[token] = hashlib.sha256(Path(item.image).read_bytes()).hexdigest()
    return ImageCheck(ok, digests)
