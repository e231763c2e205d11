"""``export`` and ``recommend`` subcommands (called by ``recbole_fmrl.cli``).

    export    --checkpoint RUN.pth|runs/saved --sizes 32 64 256 --output artifacts [--onnx] [--feature-dir DIR]
    recommend --artifact artifacts/size-64 --history ID ID ... --topk 10 [--exclude-seen] [--skip-unknown]
    recommend --artifact artifacts --input histories.jsonl --output recs.jsonl [--funnel 32:200,256]

Input lines are JSON objects with ``history`` (raw item ids, oldest first); other keys (a user id,
say) are copied to the output line. Output lines: ``items``, ``titles``, ``scores``, ``skipped``.
A failure ends in one line on stderr, ``error: <message>``, and exit status 2 (as every subcommand).
"""
import argparse
import json
import sys
from pathlib import Path

from recbole_fmrl import atomic_write
from recbole_fmrl.errors import InputError

BATCH = 256


def fail(err):
    """One line on stderr and the command line's input-error status (as every other subcommand)."""
    lines = str(err).strip().splitlines() or [type(err).__name__]
    print(f"error: {lines[0]}", file=sys.stderr)
    raise SystemExit(InputError.exit_code)


def export_parser():
    parser = argparse.ArgumentParser(prog="recbole-fmrl export", description="Export nested sizes of a trained "
                                     "FMRLRec checkpoint as standalone artifact folders (<output>/size-<m>/).")
    parser.add_argument("--checkpoint", required=True,
                        help="training checkpoint (.pth), or a folder such as runs/saved (its newest best checkpoint)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="nested sizes to export (default: all)")
    parser.add_argument("--output", required=True, help="folder receiving size-<m>/ artifact folders")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx into each artifact")
    parser.add_argument("--feature-dir", default=None, help="where the feature files are now, if moved since training")
    return parser


def export_main(argv):
    args = export_parser().parse_args(argv)
    from recbole_fmrl.deploy.export import export_sizes, load_checkpoint

    try:
        sizes = args.sizes or load_checkpoint(args.checkpoint)["export"]["model_args"]["sizes"]
        export_sizes(args.checkpoint, sizes, args.output, feature_dir=args.feature_dir, onnx=args.onnx, log=print)
    except (ValueError, OSError, KeyError, RuntimeError, ImportError) as err:
        fail(err)
    return 0


def recommend_parser():
    parser = argparse.ArgumentParser(prog="recbole-fmrl recommend", description="Top-k items from an exported "
                                     "artifact; raw item ids in, raw ids / titles / scores out (JSON lines).")
    parser.add_argument("--artifact", required=True, help="an artifact folder (size-<m>) or an export root (largest size)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", nargs="+", help="one history: raw item ids, oldest first")
    source.add_argument("--input", help="JSON lines, each with a 'history' list")
    parser.add_argument("--output", default=None, help="write JSON lines here (atomically) instead of stdout")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--size", type=int, default=None, help="serve this nested size (default: the artifact's)")
    parser.add_argument("--exclude-seen", action="store_true", help="never recommend an item of the history")
    parser.add_argument("--skip-unknown", action="store_true", help="drop unknown ids (counted as 'skipped')")
    parser.add_argument("--context", choices=("window", "full"), default="window",
                        help="window: the last MAX_ITEM_LIST_LENGTH items (as trained); full: the whole history")
    parser.add_argument("--funnel", default=None, help="e.g. 32:200,256: shortlist with size 32, rerank with 256")
    return parser


def check_ids(rec, requests, source, skip_unknown):
    """Unknown ids are an error naming the request's line (before any work), unless skipped."""
    if skip_unknown:
        return
    for number, request in requests:
        try:
            rec.encode(request["history"])
        except ValueError as err:
            raise ValueError(f"{source}:{number}: {err}") from None


def read_requests(path):
    requests = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(request, dict) or not isinstance(request.get("history"), list):
                raise ValueError(f"{path}:{number}: expected an object with a 'history' list")
            requests.append((number, request))
    return requests


def recommend_main(argv):
    args = recommend_parser().parse_args(argv)
    from recbole_fmrl.deploy.recommender import Recommender

    try:
        rec = Recommender.load(args.artifact, size=args.size)
        numbered = read_requests(args.input) if args.input else [(1, {"history": args.history})]
        check_ids(rec, numbered, args.input or "--history", args.skip_unknown)
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
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        fail(err)
    return 0
