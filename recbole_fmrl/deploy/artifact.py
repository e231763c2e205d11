"""The artifact folder format: one self-contained folder per exported size.

    manifest.json   format name/version, size, sha256 + bytes of every other file, parameter
                    counts, dataset, git commit, per-size metrics when known, model_args
    model.pt        {"model_args": {...}, "state_dict": {...}}: ``ModelArgs`` values and the weights of
                    the frozen size-m ``FMRLNet`` (model/network.py), its projected item table [N+1, m]
                    under ``item_encoder.table`` (``torch.load(weights_only=True)``)
    items.json      raw item ids in internal-id order (row 0 is padding) and titles (or null)
    model.onnx      optional: the same network for onnxruntime

A folder is written under a temporary name (``.size-<m>.<host>.<pid>.<random>.tmp``) and renamed
into place, so a reader never sees a half-written artifact; the temporary folders of killed exports
are removed by the next export into the same place. An export never deletes or merges into a folder
it did not write: an existing target that is not an artifact (or an artifact holding files its
manifest does not list) is refused naming the path, and an artifact is replaced only with
``force``. Reading verifies the format version and the sha256 of every file the manifest lists;
every problem is an ``ArtifactError`` with a one-line message naming the file.

Version 1 (before the network had one implementation) stored the table as ``item_table`` and the
trained model's d as ``hidden_size``; ``read`` upgrades it on load.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from recbole_fmrl.errors import InputError

FORMAT = "recbole_fmrl-artifact"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ITEM_TABLE = "item_encoder.table"  # the projected item table [N+1 m] in model.pt's state_dict
REEXPORT = "recbole-fmrl export --checkpoint RUN.pth --output DIR"
MANIFEST, WEIGHTS, ITEMS, ONNX = "manifest.json", "model.pt", "items.json", "model.onnx"
STAGING = re.compile(r"^\.(?P<target>.+?)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]+\.(?P<kind>tmp|old)$")


class ArtifactError(InputError):
    """An artifact folder is missing, damaged or of another format version, or an export target that
    is not one."""


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_table(folder):
    """{name: {"sha256", "bytes"}} of every file in ``folder`` except the manifest."""
    folder = Path(folder)
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def _host():
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clean_stale(parent):
    """Remove the staging folders of exports into ``parent`` that were killed (their process is gone).

    A ``.tmp`` folder is a half-written artifact: removed. An ``.old`` folder holds an artifact that a
    replacement (``force``) moved aside and was killed before putting the new one in place: it goes back
    when its target is missing, else it is removed. Folders of other machines are left alone.
    """
    parent = Path(parent)
    for entry in sorted(parent.iterdir()) if parent.is_dir() else []:
        match = STAGING.match(entry.name)
        if not match or not entry.is_dir() or match["host"] != _host() or _alive(int(match["pid"])):
            continue
        target = parent / match["target"]
        if match["kind"] == "old" and (entry / "artifact").is_dir() and not target.exists():
            os.replace(entry / "artifact", target)
        shutil.rmtree(entry, ignore_errors=True)


def is_artifact(folder) -> bool:
    """A folder holding exactly an artifact: a readable manifest of this format and the files it lists."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ArtifactError:
        return False
    listed = set(manifest.get("files", {})) | {MANIFEST}
    return all(p.is_file() and p.name in listed for p in folder.iterdir())


def check_target(target, force=False):
    """Refuse to write ``target`` over anything but an artifact, and over one without ``force``."""
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_dir() and not target.is_symlink() and is_artifact(target):
        if force:
            return
        raise ArtifactError(f"{target}: an artifact exists here; pass --force (export_sizes(..., force=True)) "
                            f"to replace it, or choose another --output")
    extra = sorted(p.name for p in target.iterdir())[:3] if target.is_dir() and not target.is_symlink() else []
    holds = f" (holds {', '.join(extra)})" if extra else ""
    raise ArtifactError(f"{target}: exists and is not an artifact{holds}; export never deletes or merges into a "
                        f"folder it did not write: move it away or choose another --output")


@contextlib.contextmanager
def staging(target, force=False):
    """Yield a temporary folder next to ``target``; on success it becomes ``target`` atomically.

    ``target`` may only be missing, or an artifact with ``force`` (``check_target``, before and after
    the work); stale staging folders of killed exports are cleaned first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target.parent)
    check_target(target, force)
    stamp = f".{target.name}.{_host()}.{os.getpid()}."
    tmp = Path(tempfile.mkdtemp(prefix=stamp, suffix=".tmp", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes a private folder; an artifact is an ordinary one
        yield tmp
        check_target(target, force)  # nothing else appeared there meanwhile
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=stamp, suffix=".old", dir=target.parent))
            os.replace(target, old / "artifact")
        os.rename(tmp, target)  # fails (no merge) if a folder appeared there since the check
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder, manifest):
    """Hash every file in ``folder`` and write the manifest (call last, inside ``staging``)."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": file_table(folder)}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def read_manifest(folder):
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise ArtifactError(f"{folder}: not an artifact folder (no such directory)")
    if not path.is_file():
        raise ArtifactError(f"{path}: manifest not found (not an exported artifact?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: damaged manifest (not valid JSON: {str(err).splitlines()[0]})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(f"{path}: unknown format version {manifest.get('format_version')!r} (this recbole_fmrl "
                            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}; re-export it: {REEXPORT})")
    return manifest


def upgrade(manifest, weights):
    """model.pt of an older format version as the current one reads it."""
    if manifest["format_version"] == 1:
        state = dict(weights["state_dict"])
        state[ITEM_TABLE] = state.pop("item_table")
        args = dict(weights["model_args"], hidden_size=weights["model_args"]["sizes"][-1])
        weights = {"model_args": args, "state_dict": state}
    return weights


def verify(folder, manifest, names=None):
    """Check size and sha256 of the listed files (default: all) against the manifest."""
    for name, meta in manifest.get("files", {}).items():
        if names is not None and name not in names:
            continue
        path = Path(folder) / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in the manifest)")
        if path.stat().st_size != meta["bytes"]:
            raise ArtifactError(f"{path}: {path.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated or damaged)")
        if sha256_file(path) != meta["sha256"]:
            raise ArtifactError(f"{path}: sha256 mismatch with the manifest (damaged or modified)")


def read(folder):
    """(manifest, {"model_args", "state_dict"}, items) of a verified artifact folder."""
    manifest = read_manifest(folder)
    for name in (WEIGHTS, ITEMS):
        if name not in manifest.get("files", {}):
            raise ArtifactError(f"{Path(folder) / MANIFEST}: does not list {name}")
    verify(folder, manifest, names={WEIGHTS, ITEMS})
    try:
        weights = upgrade(manifest, torch.load(Path(folder) / WEIGHTS, map_location="cpu", weights_only=True))
        items = json.loads((Path(folder) / ITEMS).read_text(encoding="utf-8"))
    except Exception as err:  # verified bytes that still do not load: a writer bug, say so plainly
        raise ArtifactError(f"{folder}: cannot load ({type(err).__name__}: {str(err).splitlines()[0]})") from err
    return manifest, weights, items


def size_folders(root):
    """{size: folder} of the artifacts directly under an export root (or the folder itself)."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return {int(read_manifest(root)["size"]): root}
    found = {}
    for child in sorted(root.glob("size-*")) if root.is_dir() else []:
        if (child / MANIFEST).is_file():
            found[int(read_manifest(child)["size"])] = child
    if not found:
        raise ArtifactError(f"{root}: no artifact here (no manifest.json, no size-*/manifest.json)")
    return dict(sorted(found.items()))
