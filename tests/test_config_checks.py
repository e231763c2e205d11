"""Every configuration value checked before anything loads or writes (issue 31, class 1), and honest
errors (issue 27): one test per case, through the command line.

A refused case asserts exit status 2, exactly one ``error:`` line naming the key (and the file or
``key=value`` it came from), the dataset folder byte for byte unchanged and nothing written (no
output folder at all when the configuration is refused, no checkpoint when the loaded dataset is).
"""
import pytest
import torch
from conftest import write_tiny_dataset

import run_recbole_fmrl
from recbole_fmrl.errors import InputError
from recbole_fmrl.train import schema
from recbole_fmrl.train.config import Config
from recbole_fmrl.train.registry import model_names

NAME = "cfg"
RUN = ["hidden_size=16", "fmrl_sizes=[8,16]", "epochs=1", "train_batch_size=16", "eval_batch_size=64",
       "show_progress=False", "use_gpu=False", "MAX_ITEM_LIST_LENGTH=20", "seed=7", "topk=[10]", "state=ERROR"]


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def case(tmp_path):
    root = tmp_path / "data"
    write_tiny_dataset(root, NAME, with_image=False)

    class Case:
        data, out = root, tmp_path / "runs"

        def argv(self, *extra, model="FMRLRec", dataset=NAME):
            return ["--model", model, "--dataset", dataset, f"data_path={root}", f"fmrl_output_dir={self.out}",
                    f"fmrl_cache_dir={tmp_path / 'cache'}", *RUN, *extra]

    return Case()


def refused(case, capsys, argv, written=False):
    """The one ``error:`` line of a refused command (exit 2); nothing written, the data untouched."""
    before = snapshot(case.data)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_recbole_fmrl.main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert snapshot(case.data) == before
    if written:  # refused after the dataset loaded: the log exists, no checkpoint, no TensorBoard
        saved = case.out / "saved"
        assert not (saved.exists() and any(saved.iterdir())) and not (case.out / "log_tensorboard").exists()
    else:
        assert not case.out.exists()
    return lines[0]


# ----------------------------------------------------------------------------- types and ranges

@pytest.mark.parametrize("key, value, need", [
    ("hidden_size", "abc", "need an integer >= 1"),
    ("hidden_size", "0", "need an integer >= 1"),  # was blamed on fmrl_sizes
    ("hidden_size", "16.5", "need an integer >= 1"),  # was blamed on fmrl_sizes
    ("epochs", "abc", "need an integer >= 1"),
    ("epochs", "-1", "need an integer >= 1"),  # trained nothing and reported untrained metrics, exit 0
    ("epochs", "0", "need an integer >= 1"),
    ("MAX_ITEM_LIST_LENGTH", "0", "need an integer >= 1"),  # an IndexError deep in the data loader
    ("train_batch_size", "0", "need an integer >= 1"),
    ("eval_batch_size", "-5", "need an integer >= 1"),
    ("learning_rate", "-1", "need a number > 0"),
    ("learning_rate", "abc", "need a number > 0"),
    ("weight_decay", "-0.1", "need a number >= 0"),
    ("hidden_dropout_prob", "2", "need a number >= 0 and < 1"),
    ("attn_dropout_prob", "1", "need a number >= 0 and < 1"),
    ("n_layers", "0", "need an integer >= 1"),
    ("stopping_step", "0", "need an integer >= 1"),
    ("topk", "[0]", "need a list of integers >= 1"),
    ("learner", "foo", "need one of adam, adamw"),  # RecBole fell back to Adam with a warning only
    ("seed", "1.5", "need an integer"),
    ("show_progress", "maybe", "need True or False"),
    ("fmrl_modality", "txt", "need one of auto, text_image"),
    ("fmrl_select_on", "median", "need one of largest, mean, geomean, per_size"),
    ("fmrl_train_negatives", "-1", "need an integer >= 0"),
    ("fmrl_train_negatives", "2.5", "need an integer >= 0"),
    ("fmrl_distill_weight", "-0.5", "need a number >= 0"),
    ("fmrl_distill_rows", "-3", "need an integer >= 0"),
    ("fmrl_lr_warmup_steps", "-1", "need an integer >= 0"),
    ("fmrl_lr_decay_epochs", "2.5", "need an integer >= 0"),
    ("fmrl_loss_chunk_size", "-2", "need an integer >= -1"),
    ("fmrl_scan", "fast", "need one of dense, doubling"),
    ("fmrl_feature_norm", "pca", "need one of center, whiten"),
    ("fmrl_train_objective", "every", "need one of all_positions, last_position"),
    ("fmrl_native_loss", "maybe", "need True, False or null"),
    ("fmrl_ring_r_min", "-0.1", "need a number >= 0 and < 1"),
    ("fmrl_sizes", "[8,-16]", "need a list of integers >= 1"),
    ("fmrl_size_weights", "[1,-1]", "need a list of numbers >= 0"),
])
def test_a_wrong_value_names_the_key_and_what_it_needs(case, capsys, key, value, need):
    line = refused(case, capsys, case.argv(f"{key}={value}"))
    assert line.startswith(f"error: {key}=") and "(given as key=value)" in line and need in line, line


@pytest.mark.parametrize("extra, message", [
    (["fmrl_sizes=[8,12]"], "fmrl_sizes=[8, 12] (given as key=value): need sizes ending at hidden_size=16"),
    (["fmrl_sizes=[16,8]", "hidden_size=8"], "fmrl_sizes=[16, 8] (given as key=value): need strictly increasing sizes"),
    (["fmrl_size_weights=[1,2,3]"], "fmrl_size_weights=[1, 2, 3] (given as key=value): need 2 weights, one per size [8, 16]"),
    (["fmrl_size_weights=[0,0]"], "need at least one size with a weight > 0"),
    (["fmrl_ring_r_min=0.5", "fmrl_ring_r_max=0.2"], "fmrl_ring_r_max=0.2 (given as key=value): need a radius above "
                                                     "fmrl_ring_r_min=0.5"),
    (["valid_metric=NDCG@7"], "valid_metric='NDCG@7' (given as key=value): need a cut-off listed in topk [10]"),
    (["valid_metric=MRR@10"], "valid_metric='MRR@10' (given as key=value): need one of metrics ['Recall', 'NDCG']"),
    (['metrics=["Recal"]'], "no metric 'Recal'; did you mean recall?"),
    (["eval_args={'split':{'LS':'valid_and_test'},'order':'XX','mode':'full'}"], "need order RO or TO"),
    (["eval_args={'split':{'LS':'valid_and_test'},'order':'RO','mode':'full'}"], "need order TO: FMRLRec is sequential"),
    (["eval_args={'split':{'LS':'everything'},'order':'TO','mode':'full'}"], "need split {'LS': one of valid_and_test"),
    (["eval_args={'split':{'LS':'valid_and_test'},'order':'TO','mode':'uni0'}"], "need mode full, labeled, uniN"),
    (["loss_type=BPR"], "loss_type='BPR' (given as key=value): need CE"),
])
def test_values_that_do_not_fit_together_are_refused_up_front(case, capsys, extra, message):
    assert message in refused(case, capsys, case.argv(*extra))


def test_heads_must_divide_the_hidden_size_of_an_attention_model(case, capsys):
    line = refused(case, capsys, case.argv("n_heads=3", "train_neg_sample_args=None", model="SASRecAP"))
    assert "n_heads=3 (given as key=value): need a divisor of hidden_size=16" in line


def test_heads_do_not_constrain_a_model_without_attention():
    config = Config(model="FMRLRec", dataset="ml-100k", config_dict={"n_heads": 3, "fmrl_modality": "id"})
    assert config["n_heads"] == 3  # a RecBole key FMRLRec ignores: known, so accepted, and not checked against d


# ----------------------------------------------------------------------------- unknown keys, models, files

def test_a_typo_in_a_key_names_the_closest_known_key(case, capsys):
    line = refused(case, capsys, case.argv("hiden_size=16"))  # trained at d = 256 without a word before
    assert line.startswith("error: hiden_size: unknown configuration key (given as key=value); did you mean hidden_size?")


def test_a_typo_in_a_config_file_names_the_file(case, capsys, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("learning_rate: 0.01\nfmrl_modalty: text\n")
    line = refused(case, capsys, case.argv("--config_files", str(path)))
    assert f"fmrl_modalty: unknown configuration key (in {path}); did you mean fmrl_modality?" in line


def test_a_wrong_value_in_a_config_file_names_the_file(case, capsys, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("learning_rate: fast\n")
    assert f"learning_rate='fast' (in {path}): need a number > 0" in refused(case, capsys, case.argv("--config_files", str(path)))


def test_every_recbole_key_is_known():
    """RecBole's own keys (from its YAML files and its code) pass; a baseline keeps all of them."""
    known = schema.known_keys()
    assert {"embedding_size", "n_heads", "enable_amp", "nproc", "user_inter_num_interval", "benchmark_filename",
            "kg_reverse_r", "hidden_size"} <= known
    assert set(schema.SCHEMA) <= known


def test_every_recbole_models_own_defaults_pass_the_schema():
    """A schema stricter than RecBole would refuse RecBole's own models: every one builds its Config."""
    refused_models = []
    for name in model_names():
        try:
            Config(model=name, dataset="ml-100k", config_dict={"use_gpu": False, "train_neg_sample_args": None})
        except InputError as err:
            if "needs the" not in str(err):  # lightgbm / xgboost without their packages
                refused_models.append(f"{name}: {err}")
    assert not refused_models, refused_models


def test_an_unknown_model_lists_the_models(case, capsys):
    line = refused(case, capsys, case.argv(model="NoSuchModel"))  # was "No module named 'lightgbm'"
    assert line.startswith("error: --model NoSuchModel: no such model; models: FMRLRec, LRURec, FMLPRec, SASRecAP, ")
    assert ", SASRec," in line and ", GRU4Rec," in line


def test_a_model_name_in_the_wrong_case_names_the_right_one(case, capsys):
    assert "--model sasrec: no such model; did you mean SASRec?" in refused(case, capsys, case.argv(model="sasrec"))


def test_a_yaml_syntax_error_names_file_and_line(case, capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("hidden_size: 16\nepochs: [1, 2\nfoo: 1\n")
    line = refused(case, capsys, case.argv("--config_files", str(path)))
    assert line.startswith(f"error: {path}:3:4: not valid YAML (expected ',' or ']', but got ':')"), line


def test_a_yaml_file_that_is_not_a_mapping_is_refused(case, capsys, tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- hidden_size\n- 16\n")
    assert f"{path}: a configuration file holds 'key: value' lines, this one a list" in \
        refused(case, capsys, case.argv("--config_files", str(path)))


def test_a_missing_config_file_is_named(case, capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    assert f"{missing}: configuration file not found" in refused(case, capsys, case.argv("--config_files", str(missing)))


def test_a_key_without_a_value_is_an_error_line(case, capsys):
    line = refused(case, capsys, case.argv("hidden_size"))  # was exit 1 without an error: line
    assert line.startswith("error: argument 'hidden_size': expected key=value")


# ----------------------------------------------------------------------------- the loaded dataset

def test_topk_above_the_item_count_names_topk(case, capsys):
    line = refused(case, capsys, case.argv("topk=[10,50]"), written=True)  # was "selected index k out of range"
    assert f"topk=[10, 50]: the cut-off 50 is above the 30 items of dataset {NAME}" in line and "<= 30" in line


def test_a_dataset_too_small_to_split_is_refused_with_the_reason(case, capsys):
    folder = case.data / "one"
    folder.mkdir()
    (folder / "one.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\t1\t1.0\nu2\t1\t2.0\n"
                                      "u2\t2\t3.0\n")
    line = refused(case, capsys, case.argv("fmrl_modality=id", "topk=[1]", "valid_metric=NDCG@1", dataset="one"),
                   written=True)  # was an IndexError
    assert "dataset one" in line and "is too small to split" in line
    assert "some user needs at least 4 interactions" in line and "the most any of its 2 users has is 2" in line


def test_a_dataset_just_big_enough_trains(tmp_path):
    from recbole_fmrl.train.driver import run

    folder = tmp_path / "data" / "four"
    folder.mkdir(parents=True)
    rows = [f"u{u}\t{i}\t{t}" for u in range(3) for t, i in enumerate(range(u, u + 4))]
    (folder / "four.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows) + "\n")
    result = run(model="FMRLRec", dataset="four", log=False, config_dict={
        "data_path": str(tmp_path / "data"), "fmrl_output_dir": str(tmp_path / "runs"), "fmrl_modality": "id",
        "hidden_size": 8, "epochs": 1, "topk": [1], "valid_metric": "NDCG@1", "use_gpu": False, "state": "ERROR",
        "show_progress": False})
    assert result["test_result"] is not None


# ----------------------------------------------------------------------------- honest errors

def test_a_bug_inside_training_keeps_its_traceback(case, capsys, monkeypatch):
    """A deliberate shape mismatch in the model: the traceback, then one summary line, exit status 1."""
    from recbole_fmrl.model.fmrlrec import FMRLRec

    def broken(self, interaction):
        return torch.zeros(2, 3) @ torch.zeros(4, 5)

    monkeypatch.setattr(FMRLRec, "calculate_loss", broken)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_recbole_fmrl.main(case.argv())
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "Traceback (most recent call last)" in err and "in broken" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: unexpected RuntimeError (a bug in recbole_fmrl or RecBole") and "mat1" in last


def test_debug_shows_the_traceback_of_a_configuration_error(case):
    with pytest.raises(schema.ConfigError, match="hiden_size"):
        run_recbole_fmrl.main(case.argv("hiden_size=16", "--debug"))


def test_resume_keys_are_derived_from_the_schema():
    from recbole_fmrl.train import trainer

    assert trainer.RESUME_KEYS is schema.RESUME_KEYS
    assert {"hidden_size", "fmrl_sizes", "learning_rate", "MAX_ITEM_LIST_LENGTH"} <= set(schema.RESUME_KEYS)
    assert "epochs" not in schema.RESUME_KEYS  # may be raised to train a finished run further
