"""Config: RecBole's layered configuration plus the plugin's own package-relative YAML files.

Order, later wins: RecBole defaults -> properties/overall.yaml -> properties/model/<model>.yaml ->
properties/dataset/<dataset>.yaml -> user config files -> config_dict (the command line's
``key=value`` overrides arrive here). Nothing is read from the working directory; the host
process's ``sys.argv`` is ignored (it may belong to pytest or a Ray worker).
"""
import os
from pathlib import Path

from recbole.config import Config as RecBoleConfig

from recbole_fmrl.paths import default_cache_dir, properties_dir
from recbole_fmrl.train import distributed
from recbole_fmrl.train.registry import get_model


class Config(RecBoleConfig):
    def _init_parameters_category(self):
        super()._init_parameters_category()
        # copies: RecBole's += on them would grow its module-level argument lists for the whole process
        self.parameters = {k: list(v) for k, v in self.parameters.items()}

    def _load_cmd_line(self):
        return {}

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model", "FMRLRec")
        if dataset is None:
            dataset = self.external_config_dict.get("dataset", "ml-100k")
        model_class = model if not isinstance(model, str) else get_model(model)
        return model_class.__name__, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        props = properties_dir()
        for path in (props / "overall.yaml", props / "model" / f"{model}.yaml", props / "dataset" / f"{dataset}.yaml"):
            if path.is_file():
                loaded = self._update_internal_config_dict(path)
                if path.parent.name == "dataset" and loaded:  # RecBole's rule: a dataset file's keys are dataset keys
                    self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]

    def _init_device(self):
        if distributed.requested(self.final_config_dict):  # spawned by --nproc / world_size (RecBole's keys)
            distributed.init_device(self.final_config_dict)
        else:
            super()._init_device()

    def _set_default_parameters(self):
        super()._set_default_parameters()
        cfg = self.final_config_dict
        cfg["fmrl_output_dir"] = str(Path(cfg.get("fmrl_output_dir") or "runs").expanduser().resolve())
        cfg["fmrl_cache_dir"] = str(Path(cfg.get("fmrl_cache_dir") or default_cache_dir()).expanduser().resolve())
        if not cfg.get("checkpoint_dir"):
            cfg["checkpoint_dir"] = os.path.join(cfg["fmrl_output_dir"], "saved")
        cfg["data_path"] = str(Path(cfg["data_path"]).expanduser().resolve())
