"""Converters from Amazon, P5/VIP5 and MovieLens data to RecBole atomic files plus item features.

Importable steps: ``read_amazon`` / ``read_p5`` / ``read_movielens`` -> ``SourceData``;
``convert`` -> the dataset folder; ``build_text_features`` for an existing RecBole dataset;
``build_missing_item_features(config)``, the first-use hook the training CLI passes in.
See docs/data.md.
"""
from dataset_tools.amazon import AmazonOptions, read_amazon
from dataset_tools.encoders import ImageEncoderOptions, TextEncoderOptions
from dataset_tools.item_features import build_missing_item_features, build_text_features
from dataset_tools.kcore import kcore_mask
from dataset_tools.movielens import MovieLensOptions, read_movielens
from dataset_tools.p5 import P5Options, read_p5
from dataset_tools.pipeline import ConvertOptions, convert, verify_dataset
from dataset_tools.report import BadInputError, Report

__all__ = ["AmazonOptions", "read_amazon", "P5Options", "read_p5", "MovieLensOptions", "read_movielens",
           "ConvertOptions", "convert", "verify_dataset", "build_text_features",
           "build_missing_item_features", "kcore_mask",
           "TextEncoderOptions", "ImageEncoderOptions", "Report", "BadInputError"]
