import recbole.config.configurator as recbole_configurator

import run_recbole_fmrl
from recbole_fmrl.train import driver
from recbole_fmrl.train.config import Config


def capture(monkeypatch, argv):
    seen = {}
    monkeypatch.setattr(driver, "run", lambda **kw: seen.update(kw))
    run_recbole_fmrl.main(argv)
    return seen


def test_overrides_after_the_config_file_list(monkeypatch):
    seen = capture(monkeypatch, ["--dataset", "d", "--config_files", "a.yaml", "b.yml", "hidden_size=16", "--epochs=3"])
    assert seen["config_file_list"] == ["a.yaml", "b.yml"]
    assert seen["config_dict"] == {"hidden_size": "16", "epochs": "3"}
    assert seen["model"] is None and seen["dataset"] == "d"  # the model may come from a config file


def test_model_from_a_config_file(tmp_path, tiny_root):
    (tmp_path / "best.yaml").write_text("model: SASRec\ndataset: tiny\ntrain_neg_sample_args: ~\n")
    config = Config(config_file_list=[str(tmp_path / "best.yaml")], config_dict={"data_path": str(tiny_root)})
    assert config["model"] == "SASRec" and config["dataset"] == "tiny"


def test_dataset_yaml_keys_do_not_leak_into_recbole_globals(tiny_root):
    before = list(recbole_configurator.dataset_arguments)
    Config(model="FMRLRec", dataset="ml-100k", config_dict={"fmrl_modality": "id"})
    assert recbole_configurator.dataset_arguments == before
