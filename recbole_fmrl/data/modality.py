"""Item modalities: which frozen feature tables (or a learned ID table) represent the items.

One home for ``fmrl_modality``: its choices, the feature tables each reads, and how ``auto`` resolves
against the tables a dataset has.
"""
import csv
from logging import getLogger
from pathlib import Path

from recbole_fmrl.data import features
from recbole_fmrl.errors import InputError

MODALITY_CHOICES = ("text_image", "text", "image", "id", "text_id", "image_id", "text_image_id")
# ``<features>_id``: the projected features plus a learned item-ID table (summed, nested like every weight)


def modality_parts(modality: str) -> list:
    """Feature tables a modality setting reads, e.g. 'text_image' -> ['text', 'image']."""
    if modality not in MODALITY_CHOICES:
        raise ValueError(f"fmrl_modality: unknown value {modality!r}; expected one of {MODALITY_CHOICES}")
    return [part for part in modality.split("_") if part != "id"]


def has_id_table(modality: str) -> bool:
    """Whether the items carry a learned ID embedding: 'id' alone, or a hybrid such as 'text_id'."""
    modality_parts(modality)  # validates
    return modality.split("_")[-1] == "id"


def wants_text(requested) -> bool:
    """Whether a requested modality (``auto`` included) would read a text table."""
    return requested in (None, "auto") or "text" in modality_parts(requested)


def resolve_modality(requested, found, where: str = "", item_file=None, text_fields=None) -> str:
    """The concrete modality of a run: ``requested``, or for ``auto`` every table in ``found``.

    ``auto`` with no feature table resolves to ``id`` (logged in one line) when ``item_file`` is
    given and has no text to build features from (no such file, or no non-empty cell in the text
    columns): building features there gives identical rows, a model that learns nothing.
    """
    if requested in (None, "auto"):
        if not found:
            if item_file is not None and not item_text_columns(item_file, text_fields):
                getLogger().info(f"fmrl_modality=auto -> id: no item feature tables in {where or 'the dataset folder'} "
                                 f"and {item_file} has no text to build them from (learned item IDs)")
                return "id"
            raise InputError(
                f"fmrl_modality=auto: no item features in {where or 'the dataset folder'}; build them with "
                f"`python -m dataset_tools features` or set fmrl_modality=id")
        return "text_image" if set(found) >= {"text", "image"} else found[0]
    if requested not in MODALITY_CHOICES:
        raise InputError(f"fmrl_modality: unknown value {requested!r}; expected auto or one of {MODALITY_CHOICES}")
    return requested


def item_text_columns(item_file, text_fields=None, id_field="item_id") -> list:
    """Columns of a RecBole ``.item`` file (``text_fields`` only, if given) with at least one non-empty cell."""
    item_file = Path(item_file)
    if not item_file.is_file():
        return []
    with open(item_file, encoding="utf-8-sig", errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quotechar='"')
        names = [cell.split(":", 1)[0].strip() for cell in next(reader, [])]
        wanted = [i for i, n in enumerate(names) if n != id_field and (not text_fields or n in text_fields)]
        found = set()
        for row in reader:
            found.update(i for i in wanted if i < len(row) and row[i].strip())
            if len(found) == len(wanted):
                break
    return [names[i] for i in sorted(found)]


def resolve_for_run(config):
    """Settle ``fmrl_modality: auto`` before features are built: ``id`` when the dataset has no feature
    tables and its ``.item`` file no text (then no feature builder runs); ``config`` is updated."""
    if config["fmrl_modality"] not in (None, "auto") or config["fmrl_feature_path"]:
        return config["fmrl_modality"]
    folder, name = features.locate(config), config["dataset"]
    found = features.available_modalities(folder, name)
    item_file = Path(config["data_path"]) / f"{name}.item"
    if not found and not item_text_columns(item_file, config["fmrl_text_fields"], config["ITEM_ID_FIELD"]):
        config["fmrl_modality"] = resolve_modality("auto", found, str(folder), item_file, config["fmrl_text_fields"])
    return config["fmrl_modality"]
