"""Item text features built on first use for datasets that ship a RecBole ``.item`` file.

A dataset without feature files (RecBole's bundled ml-100k, say) gets text features encoded from
its ``.item`` fields with the configured encoder, cached under ``<fmrl_cache_dir>/features/``.
The dataset folder itself is never written to.
"""
from logging import getLogger
from pathlib import Path

from recbole_fmrl.data import features as feature_files
from recbole_fmrl.registry import get_model, uses_fmrl_dataset


def ensure_item_features(config):
    """Point ``fmrl_feature_path`` at usable features, building text features if needed."""
    if not uses_fmrl_dataset(get_model(config["model"])) or config["fmrl_modality"] == "id":
        return
    name, data_dir = config["dataset"], Path(config["data_path"])
    explicit = config["fmrl_feature_path"]
    if explicit:
        return
    if feature_files.available_modalities(data_dir, name):
        config["fmrl_feature_path"] = str(data_dir)
        return
    cache = Path(config["fmrl_cache_dir"]) / "features" / name
    item_file = data_dir / f"{name}.item"
    wants_text = config["fmrl_modality"] in ("auto", "text", "text_image")
    if config["fmrl_build_text_features"] and wants_text and item_file.is_file():
        from dataset_tools.atomic import build_text_features

        getLogger().info(f"item text features for {name}: {cache} (encoder {config['fmrl_text_encoder']})")
        build_text_features(data_dir, name, fields=config["fmrl_text_fields"], encoder=config["fmrl_text_encoder"],
                            output_dir=cache, progress=config["show_progress"])
    config["fmrl_feature_path"] = str(cache)
