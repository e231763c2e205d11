"""Text features for a RecBole dataset that has only a ``.item`` file (RecBole's bundled ml-100k, say).

Two ways in:
- ``python -m dataset_tools features --data-path DIR --dataset NAME`` (an explicit step), which
  calls ``build_text_features``;
- ``build_missing_item_features(config)``, the hook the training CLI passes into ``recbole_fmrl``
  so features are built on first use without ``recbole_fmrl`` importing ``dataset_tools``.
Both read ``<name>.item`` (never modified) and write the tables in ``recbole_fmrl.data.features``'
format.
"""
import logging
from pathlib import Path
from typing import List, Optional

from dataset_tools import text as text_mod
from dataset_tools.recbole_files import AtomicFileError, AtomicItems, ensure_item_ids, read_item_file
from recbole_fmrl.data import features as feature_files
from recbole_fmrl.data.modality import wants_text

log = logging.getLogger(__name__)

# token_seq columns that hold running text (kept whole), not lists of tokens.
_TEXT_COLUMNS = ("title", "movie_title", "overview", "description")


def atomic_item_texts(items: AtomicItems, field_names: List[str]) -> List[str]:
    """Template text per row; ``token_seq`` cells are space-separated lists ("_" back to spaces)."""
    missing = [f for f in field_names if f not in items.fields]
    if missing:
        raise AtomicFileError(f"{items.path}: no field(s) {missing}; has {sorted(items.fields)}")
    texts = []
    for r in range(len(items.tokens)):
        values = {}
        for f in field_names:
            cell = items.fields[f][r].strip()
            if not cell:
                continue
            if items.types[f] == "token_seq" and f not in _TEXT_COLUMNS:
                values[f] = [t.replace("_", " ") for t in cell.split()]
            elif items.types[f] == "float" and cell.endswith(".0") and f in ("release_year", "year"):
                values[f] = cell[:-2]
            else:
                values[f] = cell
        texts.append(text_mod.item_text(values, field_names) or text_mod.PLACEHOLDER)
    return texts


def build_text_features(dataset_dir, name: str, fields: Optional[List[str]] = None,
                        encoder: str = "minilm", batch_size: int = 32, device: str = "auto",
                        output_dir=None, progress: bool = True) -> dict:
    """Build ``<name>.text.npy`` for an existing RecBole dataset from its ``<name>.item`` file.

    ``dataset_dir/<name>.item`` is read (never modified); ``fields`` are the ``.item`` columns put
    into the "Label: value" template, in order (default: every column except item_id, e.g. for
    RecBole's bundled ml-100k ``movie_title, release_year, class`` -> "Title: ...\\nYear: ...\\n
    Genres: ..."). Features go to ``output_dir`` (default ``dataset_dir``) through
    ``recbole_fmrl.data.features``; a rerun with the same item list, texts and encoder returns at
    once. Returns the manifest entry of the text modality.
    """
    from dataset_tools.encode_features import ensure_text_features
    from dataset_tools.encoders import TextEncoderOptions

    dataset_dir = Path(dataset_dir)
    out = Path(output_dir) if output_dir else dataset_dir
    item_path = dataset_dir / f"{name}.item"
    if not item_path.is_file():
        raise FileNotFoundError(f"{item_path}: no .item file to build text from")
    items = read_item_file(item_path)
    if not items.tokens:
        raise AtomicFileError(f"{item_path}: no item rows (only a header): nothing to build features for")
    field_names = list(fields) if fields else list(items.fields)
    if not field_names:
        raise AtomicFileError(f"{item_path}: no column besides item_id, nothing to build text from")
    texts = atomic_item_texts(items, field_names)
    ensure_item_ids(out, name, items.tokens)
    return ensure_text_features(
        out, name, texts, TextEncoderOptions(name=encoder, batch_size=batch_size, device=device),
        extra={"source": str(item_path), "fields": field_names}, progress=progress)


def _get(config, key: str):
    """``config[key]``, None when absent (RecBole's Config answers None; a dict raises)."""
    try:
        return config[key]
    except KeyError:
        return None


def _plugin_model(config) -> bool:
    """The run's model reads FMRLDataset features (``recbole_fmrl.train.registry.uses_fmrl_dataset``).

    Decided from RecBole's ``config.model_class`` so this package need not import the registry; a
    plain dict without it counts as the plugin's model.
    """
    model_class = getattr(config, "model_class", None)
    return model_class is None or getattr(model_class, "__module__", "").startswith("recbole_fmrl.")


def build_missing_item_features(config) -> None:
    """Point ``fmrl_feature_path`` at usable features, building text features when needed.

    ``config`` is RecBole's Config (or any dict-like with the same keys). Nothing happens for a
    model that is not the plugin's (RecBole's Config carries ``model_class``; a model outside
    ``recbole_fmrl`` reads no item features), nor when ``fmrl_modality`` is ``id`` or
    ``fmrl_feature_path`` is set. When the dataset folder has
    feature files, ``fmrl_feature_path`` becomes that folder. Otherwise text features are encoded
    from ``<name>.item`` (if ``fmrl_build_text_features`` and the modality wants text) into
    ``<fmrl_cache_dir>/features/<name>/``, and ``fmrl_feature_path`` points there; the dataset
    folder itself is never written to.
    """
    if not _plugin_model(config):
        return
    modality = _get(config, "fmrl_modality")
    if modality == "id" or _get(config, "fmrl_feature_path"):
        return
    name, data_dir = config["dataset"], Path(config["data_path"])
    if feature_files.available_modalities(data_dir, name):
        config["fmrl_feature_path"] = str(data_dir)
        return
    cache = Path(config["fmrl_cache_dir"]) / "features" / name
    item_file = data_dir / f"{name}.item"
    if _get(config, "fmrl_build_text_features") and wants_text(modality) and item_file.is_file():
        encoder = _get(config, "fmrl_text_encoder")
        log.info("item text features for %s: %s (encoder %s)", name, cache, encoder)
        build_text_features(data_dir, name, fields=_get(config, "fmrl_text_fields"), encoder=encoder,
                            output_dir=cache, progress=bool(_get(config, "show_progress")))
    config["fmrl_feature_path"] = str(cache)
