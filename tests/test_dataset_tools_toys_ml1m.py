"""The two real sets of issue 28 on tiny fixtures in their layouts: Toys (P5 files, derived keyphrases as the
item text) and ML-1M with posters (sequences without timestamps, items.tsv, posters through EfficientNet-Lite2)."""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from dataset_tools import movielens, p5, pipeline  # noqa: E402
from dataset_tools.cli import build_parser  # noqa: E402
from dataset_tools.cli import main as cli_main  # noqa: E402
from dataset_tools.encoders import TextEncoder, TextEncoderOptions  # noqa: E402
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


def rows(path):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return lines[0], [line.split("\t") for line in lines[1:]]


# ------------------------------------------------------------------------------------- Toys: keyphrases

@pytest.fixture
def toys_layout(tmp_path):
    """The P5 fixture as Toys ships: sequences and id maps, no meta.json, a keyphrase TSV."""
    folder = tmp_path / "toys"
    folder.mkdir()
    for name in ("sequential_data.txt", "datamaps.json", "keyphrases.tsv"):
        shutil.copy(FIX / "p5" / name, folder / name)
    return folder


def test_keyphrases_are_the_item_text_and_bad_rows_are_counted(toys_layout, tmp_path, bert):
    kp = toys_layout / "keyphrases.tsv"
    code = cli_main(["p5", "--input", str(toys_layout), "--keyphrases", str(kp), "--output", str(tmp_path / "out"),
                     "--name", "toys", "--kcore", "1", "--text-encoder", str(bert), "--device", "cpu",
                     "--no-progress", "--quiet"])
    assert code == 0
    folder = tmp_path / "out" / "toys"
    meta = pipeline.verify_dataset(folder, "toys")
    header, items = rows(folder / "toys.item")
    assert header == "item_id:token\tkeyphrase:token_seq"
    phrases = dict((r[0], r[1]) for r in items)
    assert phrases["B000000001"] == "rose lip balm tint beauty" and phrases["B000000012"] == "perfume floral eau"
    assert "B000000004" not in phrases and "B000000011" not in phrases  # empty keyphrase / none: no text, dropped
    problems = meta["report"]["problems"]
    assert problems["p5_item_id and asin disagree with datamaps"]["examples"][0].startswith(f"{kp}:12")
    assert problems["asin listed twice (later line skipped)"]["examples"][0].startswith(f"{kp}:14")
    assert problems["keyphrase for an asin not in datamaps"]["examples"][0].startswith(f"{kp}:15")
    assert problems["item without text"]["count"] == 1  # B000000004: an empty keyphrase
    assert problems["item without metadata"]["count"] == 1  # B000000011: no keyphrase row
    assert meta["source"]["text"] == f"derived keyphrases ({kp}), not real titles"
    assert any("derived keyphrases" in n and "not real titles" in n for n in meta["report"]["notes"])
    # row r of the text table encodes item r's "Keyphrase: ..." line
    ids = (folder / "toys.item_ids").read_text().splitlines()
    text = features.read_modality(folder, "toys", "text")
    assert text.item_ids == ids
    line = item_text({"keyphrase": phrases[ids[1]]}, ["keyphrase"])
    assert line == f"Keyphrase: {phrases[ids[1]]}"
    direct = TextEncoder(TextEncoderOptions(name=str(bert), device="cpu")).encode([line], progress=False)
    np.testing.assert_allclose(direct[0], text.array[1], atol=1e-5)


def test_keyphrases_replace_the_metadata_and_a_bad_header_is_one_line(tmp_path, capsys):
    report = Report()
    src = p5.read_p5(p5.P5Options(FIX / "p5", keyphrases=FIX / "p5" / "keyphrases.tsv"), report, progress=False)
    assert src.default_fields == ["keyphrase"] and src.item_info["B000000003"].fields == {"keyphrase": "night cream skin care"}
    assert any(n.startswith(f"{FIX / 'p5' / 'meta.json'}: not read") for n in report.notes)
    bad = tmp_path / "kp.tsv"
    bad.write_text("id\tasin\ttext\n1\tB000000001\tx\n")
    code = cli_main(["p5", "--input", str(FIX / "p5"), "--keyphrases", str(bad), "--output", str(tmp_path / "o"),
                     "--name", "x", "--text-encoder", "none", "--no-progress", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"{bad}:1: keyphrase header needs columns asin, keyphrase (tab-separated); missing keyphrase" in err


def test_keyphrases_option_says_the_text_is_derived():
    p5_parser = build_parser()._subparsers._group_actions[0].choices["p5"]
    help_text = next(a.help for a in p5_parser._actions if "--keyphrases" in a.option_strings)
    assert "DERIVED" in help_text and "not real titles" in help_text


# ------------------------------------------------------------------------------- ML-1M with posters

@pytest.fixture
def ml1m_layout(tmp_path):
    folder = tmp_path / "ml1m"
    shutil.copytree(FIX / "ml1m_posters", folder)
    from PIL import Image

    (folder / "posters").mkdir()
    for mid in range(1, 8):  # movie 8 has no poster; 3's is a placeholder (flagged in items.tsv)
        Image.new("RGB", (30 + mid, 44), ((mid * 40) % 256, (mid * 90) % 256, 120)).save(folder / "posters" / f"{mid}.jpg")
    return folder


def test_ml1m_sequences_order_items_and_report():
    report = Report()
    src = movielens.read_movielens(movielens.MovieLensOptions(FIX / "ml1m_posters", use_posters=False), report)
    problems = report.to_dict()["problems"]
    assert problems["malformed sequence line"]["examples"][0].startswith(f"{FIX / 'ml1m_posters' / 'sequences.txt'}:4")
    assert problems["user listed twice (later line skipped)"]["count"] == 1
    assert problems["malformed movie line"]["examples"][0].startswith(f"{FIX / 'ml1m_posters' / 'items.tsv'}:8")
    assert [(u, i, t) for u, i, t in zip(src.users, src.items, src.times) if u == "4"] == \
        [("4", m, float(p)) for p, m in enumerate("7654321")]  # the position is the time
    assert src.default_fields == ["title", "year", "genres", "abstract"] and src.details["placeholder_posters"] == ["3"]
    assert src.item_info["4"].fields == {"title": "Waiting to Exhale", "year": "1995", "genres": ["Comedy", "Drama"],
                                         "abstract": "A film about & four women."}


def test_ml1m_posters_convert_with_text_and_efficientnet_lite2(ml1m_layout, tmp_path, bert):
    timm = pytest.importorskip("timm")
    import torch

    from dataset_tools import efficientnet

    torch.manual_seed(0)  # random weights in the registry file's naming: the path the real weights take
    network = timm.create_model(efficientnet.SPECS["efficientnet-lite2"].arch, pretrained=False, num_classes=0)
    state = {efficientnet.source_key(network, k): v.clone() for k, v in network.state_dict().items()}
    torch.save(state, tmp_path / "lite2.pth")
    code = cli_main(["movielens", "--input", str(ml1m_layout), "--output", str(tmp_path / "out"), "--name", "m",
                     "--kcore", "1", "--missing-image", "zero", "--text-encoder", str(bert),
                     "--image-encoder", "efficientnet-lite2", "--image-checkpoint", str(tmp_path / "lite2.pth"),
                     "--image-batch-size", "3", "--image-workers", "0", "--device", "cpu", "--no-progress", "--quiet"])
    assert code == 0
    folder = tmp_path / "out" / "m"
    meta = pipeline.verify_dataset(folder, "m")
    assert meta["stats"]["users"] == 5 and meta["stats"]["items"] == 8 and meta["stats"]["images"] == 6
    ids = (folder / "m.item_ids").read_text().splitlines()
    image, text = features.read_modality(folder, "m", "image"), features.read_modality(folder, "m", "text")
    assert image.item_ids == text.item_ids == ids and image.array.shape == (8, 1280)
    row = {t: r for r, t in enumerate(ids)}
    for mid in ("3", "8"):  # placeholder and missing posters: zero rows, masked
        assert not image.mask[row[mid]] and not image.array[row[mid]].any()
    real = [row[str(m)] for m in (1, 2, 4, 5, 6, 7)]
    assert image.mask[real].all() and np.allclose(np.linalg.norm(image.array[real], axis=1), 1, atol=1e-5)
    header, _ = rows(folder / "m.item")
    assert header == "item_id:token\ttitle:token_seq\tyear:token\tgenres:token_seq\tabstract:token_seq"
    inter = [line.split("\t") for line in (folder / "m.inter").read_text().splitlines()[1:]]
    assert [(i, float(t)) for u, i, t in inter if u == "3"] == [("3", 0.0), ("1", 1.0), ("5", 2.0), ("7", 3.0), ("8", 4.0)]
    assert json.loads((folder / "m.features.json").read_text())["modalities"]["image"]["encoder"].startswith("efficientnet-lite2")
