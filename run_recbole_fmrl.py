"""Train and evaluate FMRLRec (or a baseline) from the command line, RecBole style.

    python run_recbole_fmrl.py                                   # FMRLRec on RecBole's bundled ml-100k
    python run_recbole_fmrl.py --model SASRec --dataset NAME --config_files a.yaml b.yaml hidden_size=128
    python run_recbole_fmrl.py tune --space properties/tune/fmrlrec-cpu.yaml --dataset ml-100k   # Ray Tune search
"""
import argparse
import os
import warnings
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# RecBole 1.2.1 trips pandas/torch deprecation warnings on every dataset load; they are not actionable here.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")


def parse_overrides(items):
    """``key=value`` or ``--key=value`` pairs into a dict (values typed later by RecBole's Config)."""
    out = {}
    for item in items:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            raise SystemExit(f"unrecognised argument {item!r}: expected key=value")
        out[key] = value
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tune"]:  # `tune --help` lists the search options (recbole_fmrl/tune.py)
        from recbole_fmrl.tune import main as tune_main

        return tune_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", default=None,
                        help="FMRLRec (default), LRURec, FMLPRec or any RecBole model; a config file's model: also works")
    parser.add_argument("--dataset", "-d", default=None,
                        help="dataset name, a folder under data_path (default: RecBole's bundled ml-100k)")
    parser.add_argument("--config_files", nargs="*", default=None, help="YAML files, later ones win")
    parser.add_argument("--nproc", type=int, default=1, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    # nargs="*" also swallows key=value pairs written after the file list: give them back
    files = [f for f in args.config_files or [] if "=" not in f or f.endswith((".yaml", ".yml"))]
    rest += [f for f in args.config_files or [] if f not in files]
    args.config_files = files or None
    from recbole_fmrl.quick_start import run

    run(model=args.model, dataset=args.dataset, config_file_list=args.config_files,
        config_dict=parse_overrides(rest))


if __name__ == "__main__":
    main()
