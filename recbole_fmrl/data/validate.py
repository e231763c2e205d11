"""A run's dataset folder: before it loads (manifest, schema), once it is loaded (big enough to split
and rank), and its content fingerprint (what a resumed run must share).

``check_run(config)`` is called by ``driver.prepare`` before any output is written, ``check_loaded``
after RecBole loaded (and filtered) the dataset, before the split and the model. Every problem is an
``InputError`` whose one-line message names the file, column or key (and, for a damaged dataset, the
command that rebuilds it).

- **Manifest** (``meta.json``, written last by ``dataset_tools``): every file it lists must be present
  with the recorded size and sha256, ``.item_ids`` must have ``stats.items`` rows, and every feature
  table it lists must load (rows = items, ``features.json`` hashes).
- **No manifest**: RecBole's bundled datasets and hand-made folders never have one, so a folder
  without it is accepted unless it shows an unfinished conversion or feature build: the converter's
  lock beside the folder (``.<name>.lock``: a conversion is writing it, or was killed), its encoding
  cache (``.encode-cache/``: killed while encoding), or ``<name>.item_ids`` next to ``<name>.item``
  without ``<name>.features.json`` (killed between the two; the item ids come from the ``.item`` file).
- **Schema**: the atomic files RecBole will read have ``name:type`` headers of known types, the
  ``.inter`` file has the time column when the split or the model orders by time, and every column
  ``load_col`` names exists.
- **Loaded** (``check_loaded``): the leave-one-out split leaves something to train, validate and test
  on, and every ``topk`` cut-off is at most the number of items.
- **Fingerprint** (``fingerprint``): a sha256 over the content of the dataset's files (atomic files
  and feature tables), so a resumed run can tell the same data from data of the same name.
"""
import glob
import hashlib
import json
import os
from pathlib import Path

from recbole.utils import FeatureType, ModelType

from recbole_fmrl.data import features as feature_files
from recbole_fmrl.errors import InputError

META = "meta.json"
ATOMIC_TYPES = tuple(t.value for t in FeatureType)
ATOMIC_SOURCES = ("inter", "item", "user")


def check_run(config) -> str:
    """Validate the run's dataset folder and schema; returns a one-line summary for the log (it names
    the folder used, and whether that is RecBole's bundled copy or a data_path's folder of that name)."""
    folder, name = Path(config["data_path"]), config["dataset"]
    if not folder.exists() and name in recbole_downloads() and not unfinished_marker(folder, name):
        # a name from RecBole's catalogue: RecBole downloads it (a converter's lock is refused below)
        return f"{folder}: {name} not present yet; RecBole downloads it"
    summary = check_manifest(folder, name)
    check_schema(config, folder, name)
    if bundled(folder):
        return f"dataset {name}: {summary} (RecBole's bundled copy: data_path holds no {name}/{name}.inter)"
    if name in bundled_names():
        return f"dataset {name}: {summary} (data_path's own folder, used instead of RecBole's bundled {name})"
    return f"dataset {name}: {summary}"


def bundled(folder: Path) -> bool:
    """Whether ``folder`` is one of the datasets RecBole ships inside its package (its ml-100k)."""
    import recbole

    return Path(recbole.__file__).parent.resolve() in Path(folder).resolve().parents


def bundled_names() -> set:
    """Names of the datasets RecBole ships (``recbole/dataset_example/<name>``): for these RecBole's Config
    ignores data_path and loads its own settings files, whatever folder the user has."""
    import recbole

    return {p.name for p in (Path(recbole.__file__).parent / "dataset_example").iterdir() if p.is_dir()}


def own_folder(data_root, name: str):
    """``data_root/name`` when it holds the dataset's interactions (``name.inter``, or benchmark split files
    ``name.<part>.inter``), else None."""
    folder = Path(data_root) / name
    if (folder / f"{name}.inter").is_file() or any(folder.glob(f"{glob.escape(name)}.*.inter")):
        return folder
    return None


def recbole_downloads() -> set:
    """Names of the datasets RecBole downloads when their folder is missing (its url.yaml)."""
    import recbole
    import yaml

    path = Path(recbole.__file__).parent / "properties" / "dataset" / "url.yaml"
    try:
        return set(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError):
        return set()


def check_manifest(folder: Path, name: str) -> str:
    meta_path = folder / META
    if not meta_path.is_file():
        marker = unfinished_marker(folder, name)
        if marker:
            raise InputError(
                f"{folder}: no {META} and {marker}: an unfinished conversion; rebuild it with the command "
                f"that made it (python -m dataset_tools <amazon|p5|movielens> --input ... --output {folder.parent} "
                f"--name {name}, or python -m dataset_tools features --data-path {folder.parent} --dataset {name})")
        return f"{folder}: no {META} (not a dataset_tools conversion), files taken as they are"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        files = meta["files"]
        entries = [(folder / entry["file"], entry) for entry in files.values()]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(f"{meta_path}: unreadable manifest ({type(err).__name__}: {err}); rebuild the dataset") from None
    rebuild = rebuild_command(meta, folder, name)
    for path, entry in entries:
        if not path.is_file():
            raise InputError(f"{path}: listed in {meta_path} but missing; rebuild: {rebuild}")
        digest = feature_files.sha256_file(path)
        if digest != entry.get("sha256"):
            raise InputError(f"{path}: changed since the conversion ({path.stat().st_size} bytes, sha256 {digest[:12]}..., "
                             f"{META} recorded {entry.get('bytes')} bytes, {str(entry.get('sha256'))[:12]}...); "
                             f"rebuild: {rebuild}")
    check_counts(meta, folder, name, rebuild)
    for modality in meta.get("features") or {}:
        feature_files.read_modality(folder, name, modality)  # rows = items, features.json hashes
    return f"{folder}: {len(entries)} files match {META}"


def check_counts(meta, folder: Path, name: str, rebuild: str):
    items = (meta.get("stats") or {}).get("items")
    ids = feature_files.paths(folder, name)["item_ids"]
    if items is None or not ids.is_file():
        return
    rows = sum(1 for _ in open(ids, encoding="utf-8"))
    if rows != items:
        raise InputError(f"{ids}: {rows} item rows, {folder / META} says {items} items; rebuild: {rebuild}")


def unfinished_marker(folder: Path, name: str):
    """What shows that a conversion or feature build into ``folder`` did not finish, or None."""
    lock = folder.parent / f".{name}.lock"
    if lock.exists():
        try:
            owner = json.loads(lock.read_text(encoding="utf-8"))
            who = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: "
        except (OSError, ValueError, AttributeError):
            who = ""
        return f"{lock} exists ({who}a conversion is writing this folder, or was killed)"
    if (folder / ".encode-cache").is_dir():
        return f"{folder / '.encode-cache'} exists (feature encoding did not finish)"
    p = feature_files.paths(folder, name)
    if p["item_ids"].is_file() and (folder / f"{name}.item").is_file() and not p["json"].is_file():
        return f"{p['item_ids'].name} exists without {p['json'].name}"
    return None


def rebuild_command(meta: dict, folder: Path, name: str) -> str:
    """The dataset_tools command that rebuilds ``folder`` from the inputs ``meta`` records."""
    source = meta.get("source") or {}
    inputs = [Path(i["path"]) for i in source.get("inputs") or [] if isinstance(i, dict) and i.get("path")]
    where = os.path.commonpath([str(p.parent) for p in inputs]) if inputs else "<input>"
    options = meta.get("options") or {}
    cmd = f"python -m dataset_tools {source.get('format', '<format>')} --input {where} --output {folder.parent} --name {name}"
    if options.get("kcore", 5) != 5:
        cmd += f" --kcore {options['kcore']}"
    if "text_encoder" in options and options["text_encoder"] is None:
        cmd += " --text-encoder none"
    return cmd


def atomic_files(config, folder: Path, name: str) -> dict:
    """source -> [paths] RecBole will read ('inter' may be the benchmark split files)."""
    benchmark = config["benchmark_filename"]
    inter = [folder / f"{name}.{part}.inter" for part in benchmark] if benchmark else [folder / f"{name}.inter"]
    files = {"inter": inter}
    for source in ("item", "user"):
        files[source] = [folder / f"{name}.{source}"]
    return files


def read_header(path: Path, config) -> list:
    """[(column, type)] of an atomic file's first line; a malformed header is an InputError."""
    try:
        with open(path, encoding=config["encoding"]) as fh:
            head = fh.readline().rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: header is not {config['encoding']} ({err.reason} at byte {err.start})") from None
    if head.startswith("\ufeff"):  # RecBole would read it as part of the first column's name
        raise InputError(f"{path}: starts with a byte-order mark, which RecBole reads as part of the first column "
                         f"name; save the file without it (UTF-8 without BOM)")
    columns = []
    for cell in head.split(config["field_separator"]):
        field, sep, ftype = cell.partition(":")
        if not sep or not field or ":" in ftype:
            raise InputError(f"{path}: header column {cell!r} is not 'name:type' "
                             f"(type one of {', '.join(ATOMIC_TYPES)})")
        if ftype not in ATOMIC_TYPES:
            raise InputError(f"{path}: column '{cell}' has unknown type '{ftype}'; expected one of "
                             f"{', '.join(ATOMIC_TYPES)}")
        columns.append((field, ftype))
    return columns


def loaded_sources(config) -> dict:
    """source -> set of columns ``load_col`` asks for (None: all); sources RecBole skips are absent."""
    load_col = config["load_col"]
    if load_col is None:
        return {s: None for s in ATOMIC_SOURCES}
    return {s: (None if load_col[s] == "*" else set(load_col[s])) for s in ATOMIC_SOURCES if s in load_col}


def check_schema(config, folder: Path, name: str):
    files, wanted = atomic_files(config, folder, name), loaded_sources(config)
    for path in files["inter"]:
        if not path.is_file():
            raise InputError(f"{path}: interaction file not found (data_path={folder.parent}, dataset={name}; "
                             f"build the dataset with python -m dataset_tools, or fix data_path / --dataset)")
    for source, columns in wanted.items():
        for path in files[source]:
            if not path.is_file():
                if columns:
                    raise InputError(f"load_col.{source} names {sorted(columns)}, but {path} does not exist")
                continue
            header = dict(read_header(path, config))
            if source == "inter":
                check_time_column(config, path, header)
            missing = sorted((columns or set()) - set(header))
            if missing:
                raise InputError(f"{path}: load_col.{source} names column '{missing[0]}', which the file does not "
                                 f"have (columns: {', '.join(header)})")


def check_time_column(config, path: Path, header: dict):
    """Leave-one-out by time (eval_args order TO) and sequential models sort each user's interactions by time."""
    time_field = config["TIME_FIELD"]
    by_time = (config["eval_args"] or {}).get("order") == "TO" or config["MODEL_TYPE"] == ModelType.SEQUENTIAL
    if by_time and time_field and time_field not in header:
        raise InputError(f"{path}: no '{time_field}' column (columns: {', '.join(header)}); {config['model']} "
                         f"orders each user's interactions by time (TIME_FIELD={time_field}): add a "
                         f"'{time_field}:float' column")


# ----------------------------------------------------------------------------- after loading

def leave_one_out(config):
    """How many of each user's last samples the split holds out (2: validation and test), or None when
    the split is not RecBole's leave-one-out by user (ratio splits, benchmark files)."""
    split = (config["eval_args"] or {}).get("split") or {}
    if config["benchmark_filename"] or "LS" not in split:
        return None
    return 2 if split["LS"] == "valid_and_test" else 1


def check_loaded(config, dataset):
    """After RecBole loaded and filtered the dataset, before the split: refuse, with the reason, a
    dataset whose split leaves nothing to train, validate or test on, and cut-offs above its item count."""
    name, folder = config["dataset"], config["data_path"]
    held_out = leave_one_out(config)
    if held_out is not None:
        counts = dataset.counter(dataset.uid_field)
        sequential = config["MODEL_TYPE"] == ModelType.SEQUENTIAL  # n interactions make n-1 (prefix, next) samples
        need = held_out + 1 + int(sequential)
        most = max(counts.values(), default=0)
        if most < need:
            raise InputError(
                f"dataset {name} ({folder}) is too small to split: eval_args split LS {config['eval_args']['split']['LS']} "
                f"holds out each user's last {held_out} sample(s), so some user needs at least {need} interactions "
                f"({'a sequential model learns from the ones before' if sequential else 'one left to train on'}); "
                f"the most any of its {len(counts)} users has is {most} ({sum(counts.values())} interactions in all, "
                f"after RecBole's filters)")
    items = dataset.item_num - 1  # row 0 is padding
    topk = config["topk"] or []
    if topk and max(topk) > items:
        raise InputError(f"topk={topk}: the cut-off {max(topk)} is above the {items} items of dataset {name} "
                         f"({folder}); use cut-offs <= {items}")


def fingerprint(config, feature_dir=None) -> str:
    """sha256 over the names and contents of the dataset's files (``<name>.*`` in its folder and in its
    feature folder): what a run trained on, whatever the folder is called."""
    name = config["dataset"]
    folders = [Path(config["data_path"])] + ([Path(feature_dir)] if feature_dir else [])
    files = sorted({p.resolve() for folder in folders if folder.is_dir()
                    for p in folder.glob(f"{name}.*") if p.is_file()}, key=lambda p: p.name)
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{feature_files.sha256_file(path)}\n".encode())
    return digest.hexdigest()
