"""Name -> class lookups that know the plugin's models and fall back to RecBole's.

The one place that imports RecBole's model classes, and so the one place that undoes what that
import does to the process (SINE's module switches autograd anomaly detection on).
"""
import difflib
import functools
import importlib
from pathlib import Path

import torch

from recbole_fmrl.errors import InputError

PLUGIN_MODELS = {
    "FMRLRec": "recbole_fmrl.model.fmrlrec",
    "LRURec": "recbole_fmrl.model.lrurec",
    "FMLPRec": "recbole_fmrl.model.fmlprec",
    "SASRecAP": "recbole_fmrl.model.sasrecap",
    "BSARec": "recbole_fmrl.model.bsarec",
    "UniSRec": "recbole_fmrl.model.unisrec",
}
RECBOLE_FAMILIES = ("general_recommender", "context_aware_recommender", "sequential_recommender",
                    "knowledge_aware_recommender", "exlib_recommender")


@functools.lru_cache(maxsize=1)
def recbole_models() -> dict:
    """RecBole's model names (as its model YAML files spell them) -> model family, from the files alone:
    importing a family to list it needs that family's optional packages (lightgbm, xgboost)."""
    import recbole

    root = Path(recbole.__file__).parent
    modules = {p.stem: family for family in RECBOLE_FAMILIES for p in (root / "model" / family).glob("*.py")
               if p.stem != "__init__"}
    return {p.stem: modules[p.stem.lower()] for p in sorted((root / "properties" / "model").glob("*.yaml"))
            if p.stem.lower() in modules}


def model_names() -> list:
    return list(PLUGIN_MODELS) + sorted(recbole_models(), key=str.lower)


def get_model(name: str) -> type:
    if name in PLUGIN_MODELS:
        return getattr(importlib.import_module(PLUGIN_MODELS[name]), name)
    if name not in recbole_models():
        close = [m for m in model_names() if m.lower() == str(name).lower()] or \
            difflib.get_close_matches(str(name), model_names(), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise InputError(f"--model {name}: no such model; {hint}models: {', '.join(model_names())}")
    anomaly = torch.is_anomaly_enabled()
    try:
        module = importlib.import_module(f"recbole.model.{recbole_models()[name]}.{name.lower()}")
    except ImportError as err:  # exlib models need their library
        raise InputError(f"--model {name}: needs the {err.name or 'missing'} package ({err})") from None
    finally:
        # Importing any RecBole sequential model imports SINE, whose module switches autograd anomaly
        # detection on for the whole process (recbole/model/sequential_recommender/sine.py), making
        # every backward pass several times slower. Looking a model up must not change global state.
        torch.autograd.set_detect_anomaly(anomaly)
    return getattr(module, name)


def uses_fmrl_dataset(model_class: type) -> bool:
    """Plugin models read item features / window samples from FMRLDataset."""
    return getattr(model_class, "__module__", "").startswith("recbole_fmrl.")


def create_dataset(config):
    from recbole.data import create_dataset as recbole_create_dataset

    if uses_fmrl_dataset(get_model(config["model"])):
        from recbole_fmrl.data.dataset import FMRLDataset

        return FMRLDataset(config)
    return recbole_create_dataset(config)


def get_trainer() -> type:
    """Every model, plugin or RecBole, trains with FMRLTrainer (RecBole's loop plus per-size evaluation)."""
    from recbole_fmrl.train.trainer import FMRLTrainer

    return FMRLTrainer
