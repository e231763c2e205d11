"""The command line, RecBole style: train and evaluate (default), tune, export, recommend, serve.

    recbole-fmrl                                   # the embedded default job: FMRLRec on RecBole's ml-100k
    recbole-fmrl --model SASRec --dataset NAME --config_files a.yaml b.yaml hidden_size=128
    recbole-fmrl tune --space properties/tune/fmrlrec-cpu.yaml --dataset ml-100k   # Ray Tune search
    recbole-fmrl export --checkpoint runs/saved/FMRLRec-....pth --sizes 16 64 --output artifacts
    recbole-fmrl recommend --artifact artifacts/size-64 --history 50 172 --topk 10
    recbole-fmrl serve --artifact artifacts --port 8000                               # HTTP API

``python run_recbole_fmrl.py ...`` is the same command. Errors in the input (files, columns, keys:
an ``InputError``) and of the machine (a missing file, a full disk, a read-only folder: an ``OSError``)
end in one line naming what is wrong, exit status 2; ``--debug`` (any subcommand) shows the traceback
instead. Anything else is a bug: its traceback is shown, then a one-line summary, exit status 1.
"""
import argparse
import sys
import traceback
import warnings
from typing import Optional

from recbole_fmrl.environment import set_offline_defaults
from recbole_fmrl.errors import InputError
from recbole_fmrl.paths import properties_dir

SUBCOMMANDS = ("train", "tune", "export", "recommend", "serve")


def parse_overrides(items) -> dict:
    """``key=value`` or ``--key=value`` pairs into a dict (values typed later by RecBole's Config)."""
    out = {}
    for item in items:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            raise InputError(f"argument {item!r}: expected key=value (e.g. hidden_size=64), or an option "
                             f"of `recbole-fmrl --help`")
        out[key] = value
    return out


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recbole-fmrl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", default=None,
                        help="FMRLRec (default), LRURec, FMLPRec or any RecBole model; a config file's model: also works")
    parser.add_argument("--dataset", "-d", default=None,
                        help="dataset name, a folder under data_path (default: RecBole's bundled ml-100k)")
    parser.add_argument("--config_files", nargs="*", default=None, help="YAML files, later ones win")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR_OR_CHECKPOINT",
                        help="continue a killed run from its last checkpoint (the run's fmrl_output_dir, its saved/ "
                             "folder or a *.last.pth file); give the same model, dataset and settings as before")
    # RecBole's run_recbole.py launch flags (also accepted as keys: world_size=, ip=, port=, offset=)
    parser.add_argument("--nproc", type=int, default=None, help="training processes on this machine (torch.distributed)")
    parser.add_argument("--world_size", type=int, default=None, help="processes on all machines (default: --nproc)")
    parser.add_argument("--ip", default=None, help="several machines: address of the machine running rank 0")
    parser.add_argument("--port", type=int, default=None, help="several machines: a free TCP port on that machine")
    parser.add_argument("--group_offset", type=int, default=None, help="processes on the machines before this one")
    return parser


def train_main(argv, feature_builder=None):
    """Train + evaluate one configuration; with no model, dataset or config file: the default job."""
    args, rest = train_parser().parse_known_args(argv)
    # nargs="*" also swallows key=value pairs written after the file list: give them back
    files = [f for f in args.config_files or [] if "=" not in f or f.endswith((".yaml", ".yml"))]
    rest += [f for f in args.config_files or [] if f not in files]
    if not files and args.model is None and args.dataset is None:
        files = [str(properties_dir() / "job" / "default.yaml")]
    from recbole_fmrl.train import distributed
    from recbole_fmrl.train.driver import run

    overrides = parse_overrides(rest)
    settings = distributed.settings_from(args, overrides)  # None: one process
    kwargs = dict(model=args.model, dataset=args.dataset, config_file_list=files or None,
                  feature_builder=feature_builder, resume=args.resume)
    if settings is not None:
        return distributed.launch(run, settings, overrides, **kwargs)
    return run(config_dict=overrides, **kwargs)


def dispatch(argv, feature_builder=None):
    command = argv[0] if argv[:1] and argv[0] in SUBCOMMANDS else "train"
    rest = argv[1:] if argv[:1] == [command] else argv
    if command == "tune":  # `tune --help` lists the search options
        from recbole_fmrl.tune.command import main as tune_main

        return tune_main(rest, feature_builder=feature_builder)
    if command == "export":
        from recbole_fmrl.deploy.command import export_main

        return export_main(rest)
    if command == "recommend":
        from recbole_fmrl.deploy.command import recommend_main

        return recommend_main(rest)
    if command == "serve":
        from recbole_fmrl.serve.command import serve_main

        return serve_main(rest)
    return train_main(rest, feature_builder)


def main(argv: Optional[list] = None, feature_builder=None):
    """Entry point; ``feature_builder`` (from dataset_tools) builds missing item features on first use."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    set_offline_defaults()
    # RecBole 1.2.1 trips pandas/torch deprecation warnings on every dataset load; they are not actionable here.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")
    try:
        return dispatch(argv, feature_builder)
    except (InputError, OSError) as err:  # the input or the machine: the message says what and where
        if debug:
            raise
        print(f"error: {one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(InputError.exit_code) from None
    except Exception as err:  # noqa: BLE001 - a bug: keep its traceback for the report, then say so
        traceback.print_exc()
        print(f"error: unexpected {type(err).__name__} (a bug in recbole_fmrl or RecBole; the traceback above "
              f"belongs in the report): {one_line(err)}", file=sys.stderr)
        raise SystemExit(1) from None


def one_line(err: BaseException) -> str:
    """The error's message on one line; an OSError as "what: path" (its strerror and filename)."""
    if isinstance(err, OSError) and err.strerror and err.filename is not None:
        return f"{err.strerror}: {err.filename}"
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return " ".join(lines) if lines else type(err).__name__
