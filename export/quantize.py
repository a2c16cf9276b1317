"""Quantized variants of an export, each in its own subfolder and recorded in the manifest.

Modes:
  int8-dynamic  MatMulInteger with per-channel int8 weights, activations quantized per call (CPU only)
  int8-weight   MatMulNBits, 8-bit weights in blocks (CPU and CUDA)
  int4-weight   MatMulNBits, 4-bit weights in blocks (CPU and CUDA)
  int8          the fastest int8 mode on CPU (measured with the benchmark suite): int8-dynamic
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
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
# MatMuls whose weight name matches one of these (fnmatch) stay fp32. The output projection is named "lm_head"
# in every graph (a tied one too, once rewritten to MatMul). Default: mT5's FFN output projection, whose
# activations are the large ones; on mt0-small int8-dynamic it halves the KL to fp32 at no measurable speed cost.
DEFAULT_KEEP_FP32: tuple[str, ...] = ("*DenseReluDense.wo",)


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
        # Our graphs' only Gemm is the tied output projection.
        name = "lm_head" if "lm_head" not in initializers else node.input[1] + ".transposed"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
        node.op_type, node.input[1] = "MatMul", name
        del node.attribute[:]


def _kept_nodes(model: onnx.ModelProto, patterns: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """MatMul nodes whose constant weight matches a keep-fp32 pattern -> (node names, weight names)."""
    initializers = {t.name for t in model.graph.initializer}
    nodes, weights = [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in initializers and \
                any(fnmatch.fnmatchcase(node.input[1], p) for p in patterns):
            nodes.append(node.name)
            weights.append(node.input[1])
    return nodes, weights


def _quantize_graph(source: str, target: str, mode: str, block_size: int, keep_fp32: tuple[str, ...]) -> dict:
    import logging

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(source)  # with its external data
    _gemm_to_matmul(model)
    for node in model.graph.node:  # quantizers skip nameless nodes' exclusions; every node gets a name
        node.name = node.name or f"{node.op_type}_{id(node)}"
    excluded, kept = _kept_nodes(model, keep_fp32)
    if mode == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(model, target, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=excluded, use_external_data_format=True,
                         extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
        return {"method": "dynamic", "weight_type": "int8", "per_channel": True, "ops": ["MatMul"],
                "activations": "uint8, quantized per call (DynamicQuantizeLinear)", "providers": ["cpu"],
                "kept_fp32": {"patterns": list(keep_fp32), "weights": kept}}
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = 8 if mode == "int8-weight" else 4
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=4,
                                     nodes_to_exclude=excluded)
    quantizer.process()
    quantizer.model.save_model_to_file(target, use_external_data_format=True)
    return {"method": "weight-only", "weight_type": f"int{bits}", "block_size": block_size, "symmetric": True,
            "ops": ["MatMul"], "op": "com.microsoft.MatMulNBits", "accuracy_level": 4, "providers": ["cpu", "cuda"],
            "kept_fp32": {"patterns": list(keep_fp32), "weights": kept}}


def check_options(block_size: int, keep_fp32, name: str | None) -> tuple[str, ...]:
    """Typed errors for bad quantization options, before anything is written."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or \
            block_size & (block_size - 1):
        raise ExportError(f"block size must be a power of two >= 16 (MatMulNBits), not {block_size!r}")
    patterns = (keep_fp32,) if isinstance(keep_fp32, str) else tuple(keep_fp32 or ())
    if any(not isinstance(p, str) or not p for p in patterns):
        raise ExportError(f"keep-fp32 patterns must be non-empty strings, not {keep_fp32!r}")
    if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name)
                             or name == "fp32"):
        raise ExportError(f"variant name {name!r} must be letters, digits, '.', '_' or '-' (and not fp32)")
    return patterns


def add_variant(folder: str, manifest: dict, mode: str, block_size: int = DEFAULT_BLOCK_SIZE,
                keep_fp32=DEFAULT_KEEP_FP32, name: str | None = None) -> str:
    """Write variant `name` (default: the mode's name) under folder/name/ and add it to `manifest` (the caller
    writes the manifest). keep_fp32: fnmatch patterns of weight names whose MatMuls stay fp32."""
    import onnxruntime

    mode = resolve_mode(mode)
    patterns = check_options(block_size, keep_fp32, name)
    name = name or mode
    partial = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=folder)
    kept: dict[str, list[str]] = {}
    try:
        details: dict = {}
        for role, entry in manifest["variants"]["fp32"]["files"].items():
            details = _quantize_graph(os.path.join(folder, entry["path"]), os.path.join(partial, f"{role}.onnx"),
                                      mode, block_size, patterns)
            kept[role] = details["kept_fp32"]["weights"]
        final = os.path.join(folder, name)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    files = {role: file_entry(folder, os.path.join(name, f"{role}.onnx")) for role in manifest["variants"]["fp32"]["files"]}
    details.update(onnxruntime=onnxruntime.__version__, mode=mode, kept_fp32={"patterns": list(patterns), "weights": kept})
    manifest["variants"][name] = {"quantization": details, "files": files}
    return name


def quantize_folder(folder: str, mode: str, force: bool = False, block_size: int = DEFAULT_BLOCK_SIZE,
                    keep_fp32=DEFAULT_KEEP_FP32, name: str | None = None) -> str:
    """Add a quantized variant to an existing export; the manifest is replaced atomically."""
    manifest = read_manifest(folder)
    check_options(block_size, keep_fp32, name)
    name = name or resolve_mode(mode)
    if name in manifest.variants and not force:
        raise OutputExistsError(f"{folder} already has variant {name}; pass --force to rebuild it.")
    data = manifest.data
    add_variant(folder, data, mode, block_size, keep_fp32, name)
    temporary = os.path.join(folder, ".xmtf_manifest.json.partial")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(temporary, os.path.join(folder, "xmtf_manifest.json"))
    return name
