"""``export`` and ``recommend`` subcommands (called by ``recbole_fmrl.cli``).

    export    --checkpoint RUN.pth|runs/saved --sizes 32 64 256 --output artifacts [--onnx] [--feature-dir DIR] [--force]
    recommend --artifact artifacts/size-64 --history ID ID ... --topk 10 [--exclude-seen] [--skip-unknown]
    recommend --artifact artifacts --input histories.jsonl --output recs.jsonl [--funnel 32:200,256] [--force]

Input lines are JSON objects (UTF-8) with ``history`` (raw item ids, oldest first); other keys (a
user id, say) are copied to the output line, except the result's own keys (``items``, ``titles``,
``scores``, ``skipped``): a request holding one is refused with its file:line rather than having it
overwritten. Every bad line (not UTF-8, not JSON, no ``history`` list, unknown ids, an empty history)
is refused naming file:line before any work. ``--output`` is written atomically and never over the
input or an existing file (``--force`` replaces a file). Errors reach ``recbole_fmrl.cli``: one line
on stderr, exit status 2, ``--debug`` for the traceback (as every subcommand).
"""
import argparse
import json
import sys
from pathlib import Path

from recbole_fmrl import atomic_write
from recbole_fmrl.errors import InputError

BATCH = 256
RESULT_KEYS = ("items", "titles", "scores", "skipped")


def export_parser():
    parser = argparse.ArgumentParser(prog="recbole-fmrl export", description="Export nested sizes of a trained "
                                     "FMRLRec checkpoint as standalone artifact folders (<output>/size-<m>/).")
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint (.pth), or a folder such as runs/saved (its newest best checkpoint)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="nested sizes to export (default: all)")
    parser.add_argument("--output", required=True, help="folder receiving size-<m>/ artifact folders")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx into each artifact")
    parser.add_argument("--feature-dir", default=None, help="where the feature files are now, if moved since training")
    parser.add_argument("--force", action="store_true",
                        help="replace existing artifacts (never a folder that is not one)")
    return parser


def export_main(argv):
    args = export_parser().parse_args(argv)
    from recbole_fmrl.deploy.export import export_sizes, load_checkpoint

    sizes = args.sizes or load_checkpoint(args.checkpoint)["export"]["model_args"]["sizes"]
    export_sizes(args.checkpoint, sizes, args.output, feature_dir=args.feature_dir, onnx=args.onnx, log=print,
                 force=args.force)
    return 0


def positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need an integer >= 1")
    return value


def recommend_parser():
    parser = argparse.ArgumentParser(prog="recbole-fmrl recommend", description="Top-k items from an exported "
                                     "artifact; raw item ids in, raw ids / titles / scores out (JSON lines).")
    parser.add_argument("--artifact", required=True, help="an artifact folder (size-<m>) or an export root (largest size)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", nargs="+", help="one history: raw item ids, oldest first")
    source.add_argument("--input", help="JSON lines, each with a 'history' list")
    parser.add_argument("--output", default=None, help="write JSON lines here (atomically) instead of stdout")
    parser.add_argument("--force", action="store_true", help="replace an existing --output file")
    parser.add_argument("--topk", type=positive, default=10)
    parser.add_argument("--size", type=int, default=None, help="serve this nested size (default: the artifact's)")
    parser.add_argument("--exclude-seen", action="store_true", help="never recommend an item of the history")
    parser.add_argument("--skip-unknown", action="store_true", help="drop unknown ids (counted as 'skipped')")
    parser.add_argument("--context", choices=("window", "full"), default="window",
                        help="window: the last MAX_ITEM_LIST_LENGTH items (as trained); full: the whole history")
    parser.add_argument("--funnel", default=None, help="e.g. 32:200,256: shortlist with size 32, rerank with 256; "
                        "ann32:1000,256: the shortlist from a cached faiss HNSW index (pip install -e .[serve])")
    return parser


def check_histories(rec, requests, source, skip_unknown):
    """Unknown ids (unless skipped) and histories with no known item are errors naming the request's
    line, before any work."""
    for number, request in requests:
        try:
            ids, _ = rec.encode(request["history"], skip_unknown)
        except InputError as err:
            raise InputError(f"{source}:{number}: {err}") from None
        if not ids:
            what = "holds no known item id" if request["history"] else "is empty"
            raise InputError(f"{source}:{number}: the history {what}: nothing to recommend from")


def parse_request(raw: bytes, path, number):
    """One JSON-lines request (bytes, without the line end), or an InputError naming ``path:number``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}:{number}: not UTF-8 (byte {err.start} of the line: "
                         f"{raw[max(0, err.start - 8): err.end + 8]!r})") from None
    try:
        request = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not isinstance(request, dict) or not isinstance(request.get("history"), list):
        raise InputError(f"{path}:{number}: expected an object with a 'history' list")
    clash = [key for key in RESULT_KEYS if key in request]
    if clash:
        raise InputError(f"{path}:{number}: key '{clash[0]}' is a result key ({', '.join(RESULT_KEYS)}): rename it, "
                         f"the result would overwrite it")
    return request


def read_requests(path):
    requests = []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark is not part of the JSON
                raw = raw[3:]
            if raw.strip():
                requests.append((number, parse_request(raw.rstrip(b"\r\n"), path, number)))
    return requests


def check_output(args):
    """``--output`` may not be the input, nor an existing file without ``--force``."""
    if not args.output:
        return
    output = Path(args.output)
    if args.input and output.resolve() == Path(args.input).resolve():
        raise InputError(f"--output {output}: is the --input file; write the results elsewhere")
    if output.is_dir():
        raise InputError(f"--output {output}: is a folder; name a file")
    if output.exists() and not args.force:
        raise InputError(f"--output {output}: exists; pass --force to replace it")


def recommend_main(argv):
    args = recommend_parser().parse_args(argv)
    from recbole_fmrl.deploy.recommender import Recommender

    rec = Recommender.load(args.artifact, size=args.size)
    numbered = read_requests(args.input) if args.input else [(1, {"history": args.history})]
    rec.stages(args.funnel, args.topk)  # a topk or funnel that cannot be served: refused before any work
    check_histories(rec, numbered, args.input or "--history", args.skip_unknown)
    check_output(args)
    requests = [request for _, request in numbered]
    lines = []
    for start in range(0, len(requests), BATCH):
        chunk = requests[start : start + BATCH]
        results = rec.recommend([r["history"] for r in chunk], k=args.topk, exclude_seen=args.exclude_seen,
                                skip_unknown=args.skip_unknown, context=args.context, funnel=args.funnel)
        for request, result in zip(chunk, results):
            extra = {k: v for k, v in request.items() if k != "history"}
            lines.append(json.dumps({**extra, **result}, ensure_ascii=False))
    text = "".join(line + "\n" for line in lines)
    if args.output:
        atomic_write.write_text(Path(args.output), text)
    else:
        sys.stdout.write(text)
    return 0
