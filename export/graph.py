"""A small ONNX graph builder: the families write their graphs with it, op by op.

Building the graphs directly (as onnxruntime-genai's model builder does) instead of tracing PyTorch
gives us the exact IO contract the runtime reads, one copy of every weight, and ops that
onnxruntime fuses well. Every graph is checked against PyTorch before the export is kept.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
MS_DOMAIN = "com.microsoft"
# Weights start on a 64-byte boundary (SIMD loads); page alignment would bloat small models.
ALIGNMENT = 64

DTYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}


@dataclass
class WeightFile:
    """One external-data file that several graphs may point into (a shared embedding, say)."""

    name: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, key: str, array: np.ndarray) -> None:
        self.arrays[key] = np.ascontiguousarray(array)

    def write(self, folder: str) -> dict[str, tuple[int, int]]:
        """Write every array ALIGNMENT-aligned; return key -> (offset, length)."""
        placement: dict[str, tuple[int, int]] = {}
        with open(os.path.join(folder, self.name), "wb") as handle:
            for key, array in self.arrays.items():
                offset = handle.tell()
                padding = (-offset) % ALIGNMENT
                handle.write(b"\0" * padding)
                offset += padding
                data = array.tobytes()
                handle.write(data)
                placement[key] = (offset, len(data))
        return placement


class Graph:
    """Accumulates nodes and initializers; `op` returns the name of the node's (first) output."""

    def __init__(self, name: str, weights: WeightFile):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.weights = weights
        # initializer name -> (weight file, key in that file)
        self.initializers: dict[str, tuple[WeightFile, str]] = {}
        self.constants: list[onnx.TensorProto] = []
        self._counter = 0

    def _fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        if value != name:
            self.op("Identity", [value], name=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def weight(self, name: str, array: np.ndarray, weights: WeightFile | None = None) -> str:
        """A large tensor stored as external data (in this graph's weight file unless told)."""
        target = weights or self.weights
        if name not in self.initializers:
            if name not in target.arrays:
                target.add(name, array)
            self.initializers[name] = (target, name)
        return name

    def const(self, array, dtype=np.int64) -> str:
        """A small constant stored inside the graph."""
        name = self._fresh("const")
        self.constants.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs: int = 1,
           domain: str = "", **attributes) -> str | list[str]:
        out_names = [name] if (name and outputs == 1) else [self._fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, out_names, name=self._fresh(op_type + "_node"),
                                           domain=domain, **attributes))
        return out_names[0] if outputs == 1 else out_names

    # A few composites used by both families.
    def matmul(self, x: str, weight_name: str, weight: np.ndarray, bias: np.ndarray | None = None) -> str:
        """x @ weight.T (+ bias), with weight in PyTorch's [out, in] layout."""
        y = self.op("MatMul", [x, self.weight(weight_name, np.ascontiguousarray(weight.T))])
        if bias is not None:
            y = self.op("Add", [y, self.weight(weight_name + ".bias", bias)])
        return y

    def split_heads(self, x: str, num_heads: int, head_dim: int) -> str:
        """[batch, seq, heads*d] -> [batch, heads, seq, d]"""
        x = self.op("Reshape", [x, self.const([0, 0, num_heads, head_dim])])
        return self.op("Transpose", [x], perm=[0, 2, 1, 3])

    def merge_heads(self, x: str, num_heads: int, head_dim: int) -> str:
        """[batch, heads, seq, d] -> [batch, seq, heads*d]"""
        x = self.op("Transpose", [x], perm=[0, 2, 1, 3])
        return self.op("Reshape", [x, self.const([0, 0, num_heads * head_dim])])

    def attend(self, query: str, key: str, value: str, bias: str | None, allowed: str, scale: float | None) -> str:
        """softmax(q k^T * scale + bias, masked where `allowed` is false) v; all [batch, heads, seq, d]."""
        scores = self.op("MatMul", [query, self.op("Transpose", [key], perm=[0, 1, 3, 2])])
        if scale is not None:
            scores = self.op("Mul", [scores, self.const(np.float32(scale), np.float32)])
        if bias is not None:
            scores = self.op("Add", [scores, bias])
        # Where, not an additive mask: a fully masked row (a padded query) stays finite.
        scores = self.op("Where", [allowed, scores, self.const(np.finfo(np.float32).min, np.float32)])
        probabilities = self.op("Softmax", [scores], axis=-1)
        return self.op("MatMul", [probabilities, value])

    def gelu_tanh(self, x: str) -> str:
        return self.op("FastGelu", [x], domain=MS_DOMAIN)

    def shape_dim(self, x: str, axis: int) -> str:
        """The size of one axis as a 1-element int64 tensor."""
        return self.op("Shape", [x], start=axis, end=axis + 1)

    def to_model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, initializer=self.constants)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="xmtf-onnx",
        )
        model.ir_version = 8
        return model


def save_graphs(folder: str, graphs: list[tuple[Graph, str]]) -> None:
    """Write each graph's weight files once, then each graph with external-data references into them."""
    placements: dict[str, dict[str, tuple[int, int]]] = {}
    for graph, _ in graphs:
        for weight_file, _key in graph.initializers.values():
            if weight_file.name not in placements:
                placements[weight_file.name] = weight_file.write(folder)
    for graph, filename in graphs:
        model = graph.to_model()
        for name, (weight_file, key) in graph.initializers.items():
            array = weight_file.arrays[key]
            tensor = TensorProto(name=name, data_type=DTYPES[array.dtype], dims=list(array.shape))
            offset, length = placements[weight_file.name][key]
            tensor.data_location = TensorProto.EXTERNAL
            for entry_key, entry_value in (("location", weight_file.name), ("offset", str(offset)),
                                           ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = entry_key, entry_value
            model.graph.initializer.append(tensor)
        path = os.path.join(folder, filename)
        with open(path, "wb") as handle:
            handle.write(model.SerializeToString())
        onnx.checker.check_model(path)


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
