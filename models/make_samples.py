"""(Re)write the small sample models shipped in ``models/samples/``.

Run ``python -m models.make_samples`` from the repository root. It writes, with realistic BN
statistics (:func:`models.zoo.build`, seed :data:`SEED`) and a dynamic batch dimension:

* ``lenet5.onnx``, ``mnist_mlp.onnx``, ``unet_decoder.onnx``, ``conv1d_net.onnx``,
  ``preact_net.onnx`` - legacy (TorchScript) exporter, opset 17, ``do_constant_folding=False`` so
  every ``BatchNormalization`` node stays in the graph (the script checks it); input ``"input"``,
  output ``"logits"``;
* ``lenet5_fp64.onnx`` - LeNet-5 in float64 (same exporter and opset): onnxruntime has no float64
  Conv kernel, so bnfold verifies it with the ONNX reference evaluator;
* ``cnn_opset6.onnx`` - a small CNN (Conv+BN+Relu twice, GlobalAveragePool, Gemm) built by hand at
  opset 6 (BatchNormalization-6, ``is_test=1``, IR version 3): onnxruntime has no BatchNormalization
  kernel below opset 7;
* ``lenet5.pt`` - the LeNet-5 ``state_dict`` (``bnfold fold models/samples/lenet5.pt
  --model models.lenet:lenet5 -o out.onnx``);
* ``lenet5.pt2`` - a ``torch.export`` program of LeNet-5 in eval mode, dynamic batch.

Everything is seeded, so a re-run gives the same models (and, with the same torch/onnx versions,
the same bytes; ``--check`` reports files whose bytes differ). All samples together are about 2.1 MB.
"""

from __future__ import annotations

import argparse
import collections
import io
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from models.zoo import build, example_input

__all__ = ["SAMPLES_DIR", "SEED", "ONNX_SAMPLES", "OPSET", "write_samples", "main"]

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
SEED = 0
OPSET = 17
#: file name -> zoo model name, for the ONNX samples.
ONNX_SAMPLES: dict[str, str] = {
    "lenet5.onnx": "lenet5",
    "mnist_mlp.onnx": "mnist_mlp",
    "unet_decoder.onnx": "unet_decoder",
    "conv1d_net.onnx": "conv1d_net",
    "preact_net.onnx": "preact_net",
}


def _onnx_bytes(name: str, dtype: torch.dtype = torch.float32) -> bytes:
    model = build(name, seed=SEED).to(dtype)
    x = example_input(name, batch=1, seed=SEED).to(dtype)
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buf,
        dynamo=False,
        do_constant_folding=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    data = buf.getvalue()
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    n_bn = sum(1 for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    if ops["BatchNormalization"] != n_bn:
        raise RuntimeError(
            f"{name}: export kept {ops['BatchNormalization']} BatchNormalization nodes of {n_bn} BNs"
        )
    return data


def _old_opset_bytes(opset: int = 6) -> bytes:
    """x[N,3,16,16] -> (Conv 3x3 -> BN-1 -> Relu) x2 -> GlobalAveragePool -> Flatten -> Gemm -> logits."""
    rng = np.random.default_rng(SEED)
    f32 = np.float32
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    prev, cin = "input", 3
    for i, cout in enumerate((8, 16)):
        p = f"l{i}_"
        fan = cin * 9
        inits += [
            numpy_helper.from_array(
                (rng.standard_normal((cout, cin, 3, 3)) / np.sqrt(fan)).astype(f32), p + "W"
            ),
            numpy_helper.from_array(rng.standard_normal(cout).astype(f32) * 0.1, p + "B"),
            # realistic statistics, as after training: mean != 0, var != 1, gamma != 1, beta != 0
            numpy_helper.from_array(rng.uniform(0.5, 1.5, cout).astype(f32), p + "gamma"),
            numpy_helper.from_array(rng.uniform(-0.5, 0.5, cout).astype(f32), p + "beta"),
            numpy_helper.from_array(rng.uniform(-1.0, 1.0, cout).astype(f32), p + "mean"),
            numpy_helper.from_array(rng.uniform(0.2, 3.0, cout).astype(f32), p + "var"),
        ]
        nodes += [
            helper.make_node(
                "Conv",
                [prev, p + "W", p + "B"],
                [p + "conv"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                name=f"conv{i}",
            ),
            helper.make_node(
                "BatchNormalization",
                [p + "conv", p + "gamma", p + "beta", p + "mean", p + "var"],
                [p + "bn"],
                epsilon=1e-5,
                is_test=1,
                name=f"bn{i}",
            ),
            helper.make_node("Relu", [p + "bn"], [p + "relu"], name=f"relu{i}"),
        ]
        prev, cin = p + "relu", cout
    inits += [
        numpy_helper.from_array((rng.standard_normal((10, cin)) / np.sqrt(cin)).astype(f32), "fc_W"),
        numpy_helper.from_array(rng.standard_normal(10).astype(f32) * 0.1, "fc_B"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_W", "fc_B"], ["logits"], transB=1, broadcast=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        f"cnn_opset{opset}",
        # IR version 3: initializers are graph inputs too
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])]
        + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=3,
        producer_name="models.make_samples",
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _state_dict_bytes(name: str) -> bytes:
    buf = io.BytesIO()
    torch.save(build(name, seed=SEED).state_dict(), buf)
    return buf.getvalue()


def _pt2_bytes(name: str) -> bytes:
    model = build(name, seed=SEED)
    # Batch 2 in the example: torch.export specialises a dimension whose example size is 1.
    x = example_input(name, batch=2, seed=SEED)
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def sample_bytes() -> dict[str, bytes]:
    """Every sample file's content, by file name (nothing is written)."""
    out = {fname: _onnx_bytes(name) for fname, name in ONNX_SAMPLES.items()}
    out["lenet5_fp64.onnx"] = _onnx_bytes("lenet5", torch.float64)
    out["cnn_opset6.onnx"] = _old_opset_bytes(6)
    out["lenet5.pt"] = _state_dict_bytes("lenet5")
    out["lenet5.pt2"] = _pt2_bytes("lenet5")
    return out


def write_samples(out_dir: Path = SAMPLES_DIR) -> dict[str, int]:
    """Write every sample into ``out_dir``; return file name -> size in bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    for fname, data in sample_bytes().items():
        tmp = out_dir / (fname + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(out_dir / fname)
        sizes[fname] = len(data)
    return sizes


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: write the samples, or ``--check`` them against a fresh build."""
    parser = argparse.ArgumentParser(prog="python -m models.make_samples", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=SAMPLES_DIR, help="output folder (default: models/samples)"
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a committed sample's bytes differ"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = [
            f
            for f, data in sample_bytes().items()
            if not (args.out / f).is_file() or (args.out / f).read_bytes() != data
        ]
        for f in stale:
            print(f"differs: {args.out / f}")
        print("samples up to date" if not stale else f"{len(stale)} sample(s) differ")
        return 1 if stale else 0
    sizes = write_samples(args.out)
    for fname, size in sizes.items():
        print(f"{args.out / fname}: {size / 1024:.1f} KiB")
    print(f"total: {sum(sizes.values()) / 1024 / 1024:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
