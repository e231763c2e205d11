"""Config: RecBole's layered configuration plus the plugin's own package-relative YAML files.

Order, later wins: RecBole defaults -> properties/overall.yaml -> properties/model/<model>.yaml ->
properties/dataset/<dataset>.yaml -> user config files -> config_dict (the command line's
``key=value`` overrides arrive here). Nothing is read from the working directory; the host
process's ``sys.argv`` is ignored (it may belong to pytest or a Ray worker).
"""
import os
from pathlib import Path

from recbole.config import Config as RecBoleConfig

from recbole_fmrl.registry import get_model


def properties_dir():
    """The plugin's properties/: bundled in the package when installed, else the source tree's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "properties", here.parent / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"recbole_fmrl properties/ not found next to {here}")


def default_cache_dir():
    return Path(os.environ.get("RECBOLE_FMRL_CACHE", Path.home() / ".cache" / "recbole_fmrl"))


class Config(RecBoleConfig):
    def _init_parameters_category(self):
        super()._init_parameters_category()
        self.parameters = {k: list(v) for k, v in self.parameters.items()}  # RecBole mutates these in place

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
                if path.parent.name == "dataset" and loaded:
                    # a new list: RecBole's += would grow its module-level dataset_arguments for good
                    self.parameters["Dataset"] = self.parameters["Dataset"] + [
                        k for k in loaded if k not in self.parameters["Dataset"]]

    def _set_default_parameters(self):
        super()._set_default_parameters()
        cfg = self.final_config_dict
        cfg["fmrl_output_dir"] = str(Path(cfg.get("fmrl_output_dir") or "runs").expanduser().resolve())
        cfg["fmrl_cache_dir"] = str(Path(cfg.get("fmrl_cache_dir") or default_cache_dir()).expanduser().resolve())
        if not cfg.get("checkpoint_dir"):
            cfg["checkpoint_dir"] = os.path.join(cfg["fmrl_output_dir"], "saved")
        cfg["data_path"] = str(Path(cfg["data_path"]).expanduser().resolve())
