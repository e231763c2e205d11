"""ONNX export of an artifact's network and an onnxruntime scorer (optional extra ``deploy``).

The graph maps right-padded internal ids ``items`` [B, L] (int64) and ``lengths`` [B] (int64) to
``scores`` [B, N+1] (float32); B and L are dynamic. The whole size-m forward exports: the LRU runs
on real/imaginary pairs (ONNX has no complex tensors) with its Toeplitz kernel built inside the
graph from the stored log-parameters: the network's ``infer`` with ``toeplitz=True`` (a recurrence
would unroll to the traced length). The streaming step is not exported (it is a few GEMVs; a serving
stack that wants it in ONNX can export ``FMRLBlock.step`` the same way).
"""
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from recbole_fmrl.errors import InputError
from recbole_fmrl.model.network import FMRLNet

OPSET = 17
MAX_LENGTH_KEY = "max_item_list_length"  # model metadata: the longest input the graph's kernels cover


class _Scores(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, items, lengths):
        return self.net.scores(self.net.infer(items, lengths, toeplitz=True))


def onnx_bytes(net):
    """Serialized ONNX model of ``net`` (a frozen ``FMRLNet``, cast to float32 in place).

    The graph holds the causal kernels for MAX_ITEM_LIST_LENGTH steps: inputs may be at most that long.
    """
    try:
        import onnx  # torch.onnx.export needs it too
    except ImportError as err:
        raise InputError("--onnx needs the onnx package: pip install 'recbole_fmrl[deploy]'") from err
    model = _Scores(net.float().eval())
    example = (torch.ones(2, 3, dtype=torch.long), torch.tensor([3, 1]))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
        torch.onnx.export(model, example, buffer, input_names=["items", "lengths"], output_names=["scores"],
                          dynamic_axes={"items": {0: "batch", 1: "length"}, "lengths": {0: "batch"},
                                        "scores": {0: "batch"}}, opset_version=OPSET, dynamo=False)
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(graph, {MAX_LENGTH_KEY: str(net.args.max_seq_length)})  # read by OnnxScorer
    return graph.SerializeToString()


def write_onnx(args, weights, path):
    Path(path).write_bytes(onnx_bytes(FMRLNet.from_artifact(args, weights)))


class OnnxScorer:
    """Scores from an ONNX file (or bytes) under onnxruntime, single-threaded by default."""

    def __init__(self, model, threads=1):
        try:
            import onnxruntime
        except ImportError as err:
            raise InputError("onnxruntime is not installed: pip install 'recbole_fmrl[deploy]'") from err
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        source = str(model) if isinstance(model, (str, Path)) else model
        self.session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        self.max_length = int(meta[MAX_LENGTH_KEY]) if MAX_LENGTH_KEY in meta else None  # None: an older export

    def __call__(self, items, lengths):
        """items [B L], lengths [B] (numpy or torch, int64) -> scores [B N+1] (numpy float32)."""
        feed = {"items": _numpy(items), "lengths": _numpy(lengths)}
        if self.max_length is not None and feed["items"].shape[1] > self.max_length:
            raise InputError(f"items: {feed['items'].shape[1]} steps, but this ONNX graph covers at most "
                             f"{self.max_length} (the model's MAX_ITEM_LIST_LENGTH); pass the last {self.max_length} items")
        return self.session.run(["scores"], feed)[0]


def _numpy(x):
    import numpy as np

    return np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.int64)


def artifact_to_onnx(folder, path):
    """Write the ONNX graph of an exported artifact (verified on load) to ``path``."""
    from recbole_fmrl.deploy.recommender import Recommender

    Path(path).write_bytes(onnx_bytes(Recommender.load(folder).net))
    return Path(path)
