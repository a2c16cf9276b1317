"""Quantized variants of an export, each in its own subfolder and recorded in the manifest.

Modes:
  int8-dynamic  MatMulInteger with per-channel int8 weights, activations quantized per call (CPU only)
  int8-weight   MatMulNBits, 8-bit weights in blocks (CPU and CUDA)
  int4-weight   MatMulNBits, 4-bit weights in blocks (CPU and CUDA)
  int8          the fastest int8 mode on CPU (measured with the benchmark suite): int8-dynamic
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from xmtf_onnx.runtime.manifest import read_manifest

from .errors import ExportError, OutputExistsError
from .exporter import file_entry

MODES = ("int8-dynamic", "int8-weight", "int4-weight")
ALIASES = {"int8": "int8-dynamic"}
DEFAULT_BLOCK_SIZE = 32


def resolve_mode(mode: str) -> str:
    name = ALIASES.get(mode, mode)
    if name not in MODES:
        raise ExportError(f"unknown quantization mode {mode!r}; choose int8 (fastest CPU int8), {', '.join(MODES)}")
    return name


def _gemm_to_matmul(model: onnx.ModelProto) -> None:
    """Gemm(x, W, transB=1) -> MatMul(x, W^T): the quantizers handle MatMul, not the tied lm_head's Gemm."""
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        transposed = any(a.name == "transB" and a.i == 1 for a in node.attribute)
        if node.op_type != "Gemm" or len(node.input) != 2 or not transposed or node.input[1] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]], base_dir="")
        name = node.input[1] + ".transposed"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
        node.op_type, node.input[1] = "MatMul", name
        del node.attribute[:]


def _quantize_graph(source: str, target: str, mode: str, block_size: int) -> dict:
    import logging

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(source)  # with its external data
    _gemm_to_matmul(model)
    if mode == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(model, target, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                         use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        return {"method": "dynamic", "weight_type": "int8", "per_channel": True, "ops": ["MatMul"],
                "activations": "uint8, quantized per call (DynamicQuantizeLinear)", "providers": ["cpu"]}
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = 8 if mode == "int8-weight" else 4
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(target, use_external_data_format=True)
    return {"method": "weight-only", "weight_type": f"int{bits}", "block_size": block_size, "symmetric": True,
            "ops": ["MatMul"], "op": "com.microsoft.MatMulNBits", "accuracy_level": 4, "providers": ["cpu", "cuda"]}


def add_variant(folder: str, manifest: dict, mode: str, block_size: int = DEFAULT_BLOCK_SIZE) -> str:
    """Write variant MODE under folder/MODE/ and add it to `manifest` (the caller writes the manifest)."""
    import onnxruntime

    name = resolve_mode(mode)
    partial = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=folder)
    try:
        files, details = {}, {}
        for role, entry in manifest["variants"]["fp32"]["files"].items():
            details = _quantize_graph(os.path.join(folder, entry["path"]), os.path.join(partial, f"{role}.onnx"),
                                      name, block_size)
        final = os.path.join(folder, name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    for role in manifest["variants"]["fp32"]["files"]:
        files[role] = file_entry(folder, os.path.join(name, f"{role}.onnx"))
    details["onnxruntime"] = onnxruntime.__version__
    manifest["variants"][name] = {"quantization": dict(details, mode=name), "files": files}
    return name


def quantize_folder(folder: str, mode: str, force: bool = False, block_size: int = DEFAULT_BLOCK_SIZE) -> str:
    """Add a quantized variant to an existing export; the manifest is replaced atomically."""
    manifest = read_manifest(folder)
    name = resolve_mode(mode)
    if name in manifest.variants and not force:
        raise OutputExistsError(f"{folder} already has variant {name}; pass --force to rebuild it.")
    data = manifest.data
    add_variant(folder, data, name, block_size)
    temporary = os.path.join(folder, ".xmtf_manifest.json.partial")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(temporary, os.path.join(folder, "xmtf_manifest.json"))
    return name


