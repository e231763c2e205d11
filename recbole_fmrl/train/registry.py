"""Name -> class lookups that know the plugin's models and fall back to RecBole's."""
import importlib

import torch
from recbole.utils import get_model as recbole_get_model

PLUGIN_MODELS = {
    "FMRLRec": "recbole_fmrl.model.fmrlrec",
    "LRURec": "recbole_fmrl.model.lrurec",
    "FMLPRec": "recbole_fmrl.model.fmlprec",
    "SASRecAP": "recbole_fmrl.model.sasrecap",
    "BSARec": "recbole_fmrl.model.bsarec",
    "UniSRec": "recbole_fmrl.model.unisrec",
}


def get_model(name: str) -> type:
    if name in PLUGIN_MODELS:
        return getattr(importlib.import_module(PLUGIN_MODELS[name]), name)
    anomaly = torch.is_anomaly_enabled()
    model = recbole_get_model(name)
    # Importing any RecBole sequential model imports SINE, whose module switches autograd anomaly
    # detection on for the whole process (recbole/model/sequential_recommender/sine.py), making
    # every backward pass several times slower. Looking a model up must not change global state.
    torch.autograd.set_detect_anomaly(anomaly)
    return model


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
