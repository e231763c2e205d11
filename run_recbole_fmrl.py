"""Train and evaluate FMRLRec (or a baseline), tune, export and recommend: see ``recbole_fmrl/cli.py``.

    python run_recbole_fmrl.py                                   # FMRLRec on RecBole's bundled ml-100k
    python run_recbole_fmrl.py --model SASRec --dataset NAME --config_files a.yaml b.yaml hidden_size=128
    python run_recbole_fmrl.py tune --space properties/tune/fmrlrec-cpu.yaml --dataset ml-100k

This script (also installed as the ``recbole-fmrl`` command) is where the two packages meet:
``dataset_tools`` builds item features that a dataset does not ship, and ``recbole_fmrl`` receives
that builder as a hook, so the plugin itself never imports the converters.
"""
import sys


def main(argv=None):
    from recbole_fmrl.cli import main as cli_main

    try:
        from dataset_tools.item_features import build_missing_item_features as builder
    except ImportError:  # dataset_tools not installed: datasets must ship their feature files
        builder = None
    return cli_main(sys.argv[1:] if argv is None else argv, feature_builder=builder)


if __name__ == "__main__":
    main()
