"""Config: RecBole's layered configuration plus the plugin's own package-relative YAML files.

Order, later wins: RecBole defaults -> properties/overall.yaml -> properties/model/<model>.yaml ->
properties/dataset/<dataset>.yaml -> user config files -> config_dict (the command line's
``key=value`` overrides arrive here). Nothing is read from the working directory; the host
process's ``sys.argv`` is ignored (it may belong to pytest or a Ray worker).

Every key is checked by the typed schema (``schema.py``) before RecBole acts on it: unknown keys,
wrong types and ranges are a ``ConfigError`` naming the key and where it came from (a config file
or ``key=value``). A ``data_path`` that holds ``<dataset>/<dataset>.inter`` is the dataset's folder
even for a name RecBole bundles (``ml-100k``): RecBole would silently use its own copy instead, and
the settings written for its copy (RecBole's and the plugin's ``properties/dataset/ml-100k.yaml`` and
RecBole's ml-100k quick-start files: columns, text fields) are not loaded for the user's folder.
"""
import os
from pathlib import Path

from recbole.config import Config as RecBoleConfig

from recbole_fmrl.data import validate
from recbole_fmrl.paths import default_cache_dir, properties_dir
from recbole_fmrl.train import distributed, schema
from recbole_fmrl.train.registry import get_model

COMMAND_LINE = "given as key=value"
RECBOLE_DATA_PATH = "dataset/"  # data_path's default in RecBole's properties/overall.yaml (a test compares)


class Config(RecBoleConfig):
    def _init_parameters_category(self):
        super()._init_parameters_category()
        # copies: RecBole's += on them would grow its module-level argument lists for the whole process
        self.parameters = {k: list(v) for k, v in self.parameters.items()}
        self.key_sources = {}  # key -> the config file or "key=value" it came from (for error messages)

    def _load_config_files(self, file_list):
        merged = {}
        for file in file_list or []:
            loaded = schema.read_yaml(file, self.yaml_loader)  # one line naming file:line on a parse error
            self.key_sources.update({key: f"in {file}" for key in loaded})
            merged.update(loaded)
        return merged

    def _load_variable_config_dict(self, config_dict):
        loaded = super()._load_variable_config_dict(config_dict)
        self.key_sources.update({key: COMMAND_LINE for key in loaded})
        return loaded

    def _load_cmd_line(self):
        return {}

    def _merge_external_config_dict(self):
        super()._merge_external_config_dict()
        schema.check_keys(self.external_config_dict, self.key_sources)

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model", "FMRLRec")
        if dataset is None:
            dataset = self.external_config_dict.get("dataset", "ml-100k")
        model_class = model if not isinstance(model, str) else get_model(model)
        return model_class.__name__, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        self.own_bundled = self._own_bundled_folder(dataset)
        settings = dataset if self.own_bundled is None else ""  # "": no dataset's settings file
        super()._load_internal_config_dict(model, model_class, settings)
        self.model_keys = set(self.internal_config_dict)  # before the plugin's files: RecBole's model YAML
        props = properties_dir()
        for path in (props / "overall.yaml", props / "model" / f"{model}.yaml", props / "dataset" / f"{settings}.yaml"):
            if path.is_file():
                loaded = self._update_internal_config_dict(path)
                if path.parent.name == "model" and loaded:
                    self.model_keys |= set(loaded)
                if path.parent.name == "dataset" and loaded:  # RecBole's rule: a dataset file's keys are dataset keys
                    self.parameters["Dataset"] += [k for k in loaded if k not in self.parameters["Dataset"]]

    def _own_bundled_folder(self, dataset):
        """The run's data_path folder for a name RecBole bundles (``ml-100k``), when it has one, else None.

        Decided before any settings file loads (which ones load depends on it), so from the user's own
        data_path or RecBole's default.
        """
        root = self.external_config_dict.get("data_path", RECBOLE_DATA_PATH)
        if dataset not in validate.bundled_names() or not isinstance(root, str):  # the schema refuses a non-text one
            return None
        return validate.own_folder(root, dataset)

    def _init_device(self):
        if distributed.requested(self.final_config_dict):  # spawned by --nproc / world_size (RecBole's keys)
            distributed.init_device(self.final_config_dict)
        else:
            super()._init_device()

    def _set_default_parameters(self):
        cfg = self.final_config_dict
        schema.check_values({**cfg, "model": self.model, "dataset": self.dataset}, self.key_sources, self.model_keys)
        try:
            super()._set_default_parameters()
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:  # RecBole's own checks of a value
            raise schema.ConfigError(f"configuration: {err}") from err
        if self.own_bundled is not None:
            cfg["data_path"] = str(self.own_bundled)  # RecBole set its bundled copy of that name
        cfg["fmrl_output_dir"] = str(Path(cfg["fmrl_output_dir"]).expanduser().resolve())
        cfg["fmrl_cache_dir"] = str(Path(cfg["fmrl_cache_dir"] or default_cache_dir()).expanduser().resolve())  # ~: the default cache
        if not cfg.get("checkpoint_dir"):
            cfg["checkpoint_dir"] = os.path.join(cfg["fmrl_output_dir"], "saved")
        cfg["data_path"] = str(Path(cfg["data_path"]).expanduser().resolve())
