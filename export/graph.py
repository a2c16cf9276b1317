"""A small ONNX graph builder that streams its weights to disk: the families write their graphs with it.

Building the graphs directly (as onnxruntime-genai's model builder does) instead of tracing PyTorch
gives us the exact IO contract the runtime reads, one copy of every weight, and ops that
onnxruntime fuses well. Every weight is written to its external-data file the moment the graph
asks for it (transposed or quantized on the way) and then dropped: memory holds one tensor, or one
block of rows of the 250k-row embeddings, never the model. A WeightPlan decides how each MatMul
weight is stored (fp32, or quantized straight from the checkpoint).
"""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .weights import ArraySource, rows_per_chunk

OPSET = 17
MS_DOMAIN = "com.microsoft"
# Large weights start on a page boundary, so that onnxruntime memory-maps them instead of copying them to
# the heap; small ones on 64 bytes (SIMD loads), so that a tiny model is not mostly padding.
PAGE = 4096
ALIGNMENT = 64
PAGE_ALIGNED_FROM = 1 << 16  # bytes

DTYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.bool_): TensorProto.BOOL,
}

# The quantized modes the builder writes straight from the checkpoint (fp16 is derived from the fp32 graphs).
BUILT_MODES = ("int8-dynamic", "int8-weight", "int4-weight")


@dataclass(frozen=True)
class WeightPlan:
    """How MatMul weights (and the embedding table) are stored. mode: fp32, int8-dynamic (DynamicQuantizeMatMul,
    per-channel int8), int8-weight / int4-weight (MatMulNBits, symmetric blocks). Weights whose name matches a
    keep_fp32 pattern stay fp32."""

    mode: str = "fp32"
    block_size: int = 32
    keep_fp32: tuple[str, ...] = ()

    def quantizes(self, name: str) -> bool:
        return self.mode != "fp32" and not any(fnmatch.fnmatchcase(name, p) for p in self.keep_fp32)

    @property
    def bits(self) -> int:
        return 4 if self.mode == "int4-weight" else 8


@dataclass
class Placement:
    offset: int
    length: int
    dtype: np.dtype
    shape: tuple[int, ...]


@dataclass
class WeightFile:
    """One external-data file that several graphs may point into (a shared embedding, say), written as it grows."""

    name: str
    folder: str | None = None
    placements: dict[str, Placement] = field(default_factory=dict)
    # weight name -> largest |read back and dequantized - source| in quantization steps (see check_quantized)
    checks: dict[str, float] = field(default_factory=dict)
    _end: int = 0

    def bind(self, folder: str) -> "WeightFile":
        self.folder = folder
        open(os.path.join(folder, self.name), "wb").close()
        return self

    def reserve(self, key: str, dtype, shape: tuple[int, ...]) -> Placement:
        """Room for a tensor, aligned; fill it with write_rows / write_columns."""
        if self.folder is None:
            raise RuntimeError(f"weight file {self.name} is not bound to a folder")
        dtype = np.dtype(dtype)
        length = math.prod(shape) * dtype.itemsize
        alignment = PAGE if length >= PAGE_ALIGNED_FROM else ALIGNMENT
        offset = self._end + (-self._end) % alignment
        self._end = offset + length
        with open(os.path.join(self.folder, self.name), "r+b") as handle:
            handle.truncate(self._end)
        placement = Placement(offset, length, dtype, tuple(int(d) for d in shape))
        self.placements[key] = placement
        return placement

    def write_rows(self, key: str, start: int, rows: np.ndarray) -> None:
        """rows [n, ...] at row `start` of the reserved tensor."""
        placement = self.placements[key]
        row_bytes = placement.length // max(1, placement.shape[0]) if placement.shape else placement.length
        data = np.ascontiguousarray(rows, dtype=placement.dtype).tobytes()
        with open(os.path.join(self.folder, self.name), "r+b") as handle:
            os.pwrite(handle.fileno(), data, placement.offset + start * row_bytes)

    def write_columns(self, key: str, start: int, columns: np.ndarray) -> None:
        """columns [rows, n] at column `start` of a reserved 2-D tensor (a transposed layout written in blocks)."""
        placement = self.placements[key]
        columns = np.ascontiguousarray(columns, dtype=placement.dtype)
        width, item = placement.shape[1], placement.dtype.itemsize
        with open(os.path.join(self.folder, self.name), "r+b") as handle:
            for row in range(columns.shape[0]):
                os.pwrite(handle.fileno(), columns[row].tobytes(), placement.offset + (row * width + start) * item)

    def rows_view(self, key: str, start: int, stop: int) -> str:
        """Rows start:stop of the tensor written under `key`, as a tensor of their own over the same bytes (nothing
        is written); returns its key."""
        placement = self.placements[key]
        row_bytes = placement.length // placement.shape[0]
        view = f"{key}[{start}:{stop}]"
        self.placements[view] = Placement(placement.offset + start * row_bytes, (stop - start) * row_bytes,
                                          placement.dtype, (stop - start, *placement.shape[1:]))
        return view

    def add(self, key: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.reserve(key, array.dtype, array.shape)
        self.write_rows(key, 0, array.reshape(array.shape or (1,)))

    def tensor(self, name: str, key: str, shape: tuple[int, ...] | None = None) -> TensorProto:
        """An initializer `name` over the bytes written under `key` (read as `shape` if given)."""
        placement = self.placements[key]
        shape = placement.shape if shape is None else tuple(shape)
        if math.prod(shape) * placement.dtype.itemsize != placement.length:
            raise RuntimeError(f"{name}: shape {shape} does not cover the {placement.length} bytes of {key}")
        tensor = TensorProto(name=name, data_type=DTYPES[placement.dtype], dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for entry_key, entry_value in (("location", self.name), ("offset", str(placement.offset)),
                                       ("length", str(placement.length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = entry_key, entry_value
        return tensor

    def read(self, key: str) -> np.ndarray:
        """A written tensor, memory-mapped (to check what was written)."""
        placement = self.placements[key]
        return np.memmap(os.path.join(self.folder, self.name), dtype=placement.dtype, mode="r",
                         offset=placement.offset, shape=placement.shape)


class Graph:
    """Accumulates nodes and initializers; `op` returns the name of the node's (first) output."""

    def __init__(self, name: str, weights: WeightFile, plan: WeightPlan | None = None):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.weights = weights
        self.plan = plan or WeightPlan()
        # initializer name -> (weight file, key in that file, shape it is read as)
        self.initializers: dict[str, tuple[WeightFile, str, tuple[int, ...]]] = {}
        self.constants: list[onnx.TensorProto] = []
        self.quantized: list[str] = []  # weight names written quantized (for the manifest)
        self.kept_fp32: list[str] = []  # quantizable weights kept fp32 by the plan
        # the shared-buffer form (see cached_attention): per layer (portable attention node, nodes it replaces,
        # its replacement); inputs it drops (None) or whose axis it calls capacity; the lengths' nodes
        self.shared_attention: list[tuple[onnx.NodeProto, list[onnx.NodeProto], Callable]] = []
        self.shared_inputs: dict[str, int | None] = {}
        self.shared_setup: list[onnx.NodeProto] = []
        self._counter = 0

    def _fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> str:
        """Make `value` a graph output called `name`. A value a node of this graph computes is renamed rather than
        copied: onnxruntime then writes it straight into the caller's bound buffer (an Identity copied every
        layer's present cache once more per step). Inputs, weights and values already output are copied."""
        producers = {out for node in self.nodes for out in node.output}
        taken = {o.name for o in self.outputs}
        if value != name and value in producers and value not in taken:
            for node in self.nodes:
                node.input[:] = [name if n == value else n for n in node.input]
                node.output[:] = [name if n == value else n for n in node.output]
        elif value != name:
            self.op("Identity", [value], name=name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def weight(self, name: str, array: np.ndarray, weights: WeightFile | None = None) -> str:
        """A tensor stored as external data (in this graph's weight file unless told), written now."""
        target = weights or self.weights
        if name not in target.placements:
            target.add(name, array)
        return self.refer(name, target, name)

    def refer(self, name: str, weights: WeightFile, key: str, shape: tuple[int, ...] | None = None) -> str:
        """An initializer over bytes already written under `key` (read as `shape` if given: one copy, two views)."""
        self.initializers[name] = (weights, key, tuple(shape) if shape is not None else weights.placements[key].shape)
        return name

    def const(self, array, dtype=np.int64) -> str:
        """A small constant stored inside the graph."""
        name = self._fresh("const")
        self.constants.append(numpy_helper.from_array(np.asarray(array, dtype=dtype), name))
        return name

    def extend(self, nodes: list[onnx.NodeProto]) -> str:
        """Nodes made by a helper both the builder and `quantize` use; returns the last one's (first) output."""
        self.nodes.extend(nodes)
        return nodes[-1].output[0]

    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs: int = 1,
           domain: str = "", **attributes) -> str | list[str]:
        out_names = [name] if (name and outputs == 1) else [self._fresh(op_type) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, out_names, name=self._fresh(op_type + "_node"),
                                           domain=domain, **attributes))
        return out_names[0] if outputs == 1 else out_names

    # A few composites used by both families.
    def matmul(self, x: str, weight_name: str, weight: np.ndarray, bias: np.ndarray | None = None) -> str:
        """x @ weight.T (+ bias), with weight in PyTorch's [out, in] layout, stored as the plan says."""
        if self.plan.quantizes(weight_name):
            y = self._quantized_matmul(x, weight_name, weight)
        else:
            if self.plan.mode != "fp32":
                self.kept_fp32.append(weight_name)
            key = fp32_columns(self.weights, weight_name, ArraySource({weight_name: weight}), weight_name)
            y = self.op("MatMul", [x, self.refer(weight_name, self.weights, key)])
        if bias is not None:
            y = self.op("Add", [y, self.weight(weight_name + ".bias", bias)])
        return y

    def _quantized_matmul(self, x: str, weight_name: str, weight: np.ndarray) -> str:
        """Quantized in blocks of rows (memory: the weight and one block), read back and checked as written."""
        out_features, in_features = weight.shape
        self.quantized.append(weight_name)
        source = ArraySource({weight_name: weight})
        if self.plan.mode == "int8-dynamic":
            base = int8_columns_table(self.weights, weight_name, source, weight_name)
            return self.op("DynamicQuantizeMatMul", [x, self.refer(base, self.weights, base),
                                                     self.refer(base + ".scale", self.weights, base + ".scale")],
                           domain=MS_DOMAIN)
        base = block_table(self.weights, weight_name, source, weight_name, self.plan.bits, self.plan.block_size)
        blocks = self.weights.placements[base + ".scales"].shape[1]
        return self.op("MatMulNBits", [x, self.refer(base, self.weights, base),
                                       self.refer(base + ".scales", self.weights, base + ".scales",
                                                  (out_features * blocks,))],
                       domain=MS_DOMAIN, K=in_features, N=out_features, bits=self.plan.bits,
                       block_size=self.plan.block_size, accuracy_level=4)

    def attention(self, query: str, key: str, value: str, bias: str, num_heads: int, scale: float) -> str:
        """softmax(q k^T * scale + bias) v per head, one fused node (onnxruntime's MultiHeadAttention: ~15 nodes
        fewer per layer than the op-by-op form). query [batch, seq, heads*d] -> context [batch, seq, heads*d];
        key / value [batch, seq, heads*d], or [batch, heads, keys, d] (a cache: see append_cache); bias
        [batch | 1, heads | 1, seq, keys] carries every mask (see masked_bias)."""
        return self.op("MultiHeadAttention", [query, key, value, "", "", bias], domain=MS_DOMAIN,
                       num_heads=num_heads, scale=float(scale))

    def append_cache(self, past: str, new: str, beam_idx: str, num_heads: int, head_dim: int) -> str:
        """The present cache [batch, heads, past + seq, d]: the past [past_batch, heads, past, d] reordered by
        beam_idx (beam search), then this step's keys or values [batch, seq, heads*d]. The cache is appended
        here rather than inside MultiHeadAttention (its past input) because onnxruntime then keeps every
        layer's reordered past alive to the end of the run: +0.2 GB of peak memory at 8x4 beams on bloomz-560m."""
        return self.op("Concat", [self.op("Gather", [past, beam_idx], axis=0), self.split_heads(new, num_heads, head_dim)],
                       axis=2)

    def cached_attention(self, query: str, key: str, value: str, past: tuple[str, str], beam_idx: str, bias: str,
                         lengths: tuple[str, str], num_heads: int, head_dim: int, scale: float,
                         packed: str | None = None) -> tuple[str, str, str]:
        """Self-attention over a KV cache: (context [batch, seq, heads*d], present key, present value).

        Written twice (see to_model): the portable form reorders the past for beam search (beam_idx), appends
        this step's keys and values (append_cache) and attends with MultiHeadAttention; the shared-buffer form
        is one GroupQueryAttention node per layer whose past and present are one [batch, heads, capacity, d]
        buffer it writes this step's keys and values into (the runtime reorders beams between steps): nine
        nodes fewer per layer and no cache copied per step. lengths: the mask's (total - 1 per row, int32
        [batch]; total, int32 scalar), see cache_lengths. packed: query, key and value as one [batch, seq,
        3*heads*d] tensor that the caller split into them (the split is left out of the shared form)."""
        first = len(self.nodes)
        key_cache = self.append_cache(past[0], key, beam_idx, num_heads, head_dim)
        value_cache = self.append_cache(past[1], value, beam_idx, num_heads, head_dim)
        context = self.attention(query, key_cache, value_cache, bias, num_heads, scale)
        replaced = self.nodes[first:]
        if packed is not None:
            replaced += [node for node in self.nodes[:first] if query in node.output]
        portable = self.nodes[-1]
        concats = [node for node in replaced if node.op_type == "Concat"]
        inputs = [packed, "", ""] if packed is not None else [query, key, value]

        def shared_node() -> onnx.NodeProto:  # read at to_model: graph.output may have renamed the presents
            return helper.make_node("GroupQueryAttention", [*inputs, *past, *lengths, "", "", "", bias],
                                    [portable.output[0], *(node.output[0] for node in concats)],
                                    name=portable.name + "_shared", domain=MS_DOMAIN, num_heads=num_heads,
                                    kv_num_heads=num_heads, scale=float(scale))

        self.shared_attention.append((portable, replaced, shared_node))
        self.shared_inputs.update({beam_idx: None, past[0]: 2, past[1]: 2})
        return context, key_cache, value_cache

    def cache_lengths(self, attention_mask: str) -> tuple[str, str]:
        """GroupQueryAttention's lengths from the mask [batch, total]: (total - 1 per row, total), int32. Made in
        the shared-buffer form only: the portable form has no use for them."""
        n = {key: self._fresh(key) for key in ("one", "width", "rows", "squeezed", "minus_one", "expanded",
                                               "seqlens_k", "total_sequence_length")}

        def node(op_type: str, inputs: list[str], output: str, **attributes) -> onnx.NodeProto:
            return helper.make_node(op_type, inputs, [n[output]], name=n[output] + "_node", **attributes)

        self.shared_setup = [
            helper.make_node("Constant", [], [n["one"]], name=n["one"] + "_node",
                             value=numpy_helper.from_array(np.array([1], np.int64))),
            node("Shape", [attention_mask], "width", start=1, end=2),
            node("Shape", [attention_mask], "rows", start=0, end=1),
            node("Squeeze", [n["width"]], "squeezed"),
            node("Cast", [n["squeezed"]], "total_sequence_length", to=TensorProto.INT32),
            node("Sub", [n["width"], n["one"]], "minus_one"),
            node("Expand", [n["minus_one"], n["rows"]], "expanded"),
            node("Cast", [n["expanded"]], "seqlens_k", to=TensorProto.INT32),
        ]
        return n["seqlens_k"], n["total_sequence_length"]

    def split_heads(self, x: str, num_heads: int, head_dim: int) -> str:
        """[batch, seq, heads*d] -> [batch, heads, seq, d]"""
        x = self.op("Reshape", [x, self.const([0, 0, num_heads, head_dim])])
        return self.op("Transpose", [x], perm=[0, 2, 1, 3])

    def masked_bias(self, allowed: str, bias: str | None) -> str:
        """The additive attention bias: `bias` (0 if None) where `allowed`, float32's lowest elsewhere. Added to
        any finite score that stays the lowest float, so a masked key's weight is exactly 0 and a query with
        every key masked (a padded row) gets finite, uniform weights."""
        keep = bias if bias is not None else self.const(np.float32(0), np.float32)
        return self.op("Where", [allowed, keep, self.const(np.finfo(np.float32).min, np.float32)])

    def norm(self, x: str, gamma: str, eps: float, beta: str | None = None, skip: str | None = None) -> tuple[str, str]:
        """(normalized, sum): LayerNormalization (with beta) or RMS normalization (T5's, without), of x + skip
        when skip is given, fused with the residual addition into one node (Skip[Simplified]LayerNormalization);
        sum is x + skip (x without skip), the residual stream that goes on."""
        kind = "LayerNormalization" if beta is not None else "SimplifiedLayerNormalization"
        if skip is None and beta is not None:
            return self.op(kind, [x, gamma, beta], axis=-1, epsilon=float(eps)), x
        if skip is None:  # no standard ONNX op before opset 23; the first and last norms of a stack only
            variance = self.op("ReduceMean", [self.op("Mul", [x, x])], axes=[-1], keepdims=1)
            denominator = self.op("Sqrt", [self.op("Add", [variance, self.const(np.float32(eps), np.float32)])])
            return self.op("Mul", [self.op("Div", [x, denominator]), gamma]), x
        normed, total = self._fresh("Skip" + kind), self._fresh("residual")
        inputs = [x, skip, gamma] + ([beta] if beta is not None else [])
        self.nodes.append(helper.make_node("Skip" + kind, inputs, [normed, "", "", total],
                                           name=self._fresh("Skip" + kind + "_node"), domain=MS_DOMAIN,
                                           epsilon=float(eps)))
        return normed, total

    def gelu_tanh(self, x: str) -> str:
        return self.op("FastGelu", [x], domain=MS_DOMAIN)

    def shape_dim(self, x: str, axis: int) -> str:
        """The size of one axis as a 1-element int64 tensor."""
        return self.op("Shape", [x], start=axis, end=axis + 1)

    @property
    def has_shared_form(self) -> bool:
        return bool(self.shared_attention)

    def to_model(self, shared: bool = False) -> onnx.ModelProto:
        """The graph as written: portable, or (shared=True) its shared-buffer form (see cached_attention), where
        the reorder input is gone and every cache input and output has a capacity axis instead of its length."""
        nodes, inputs, outputs, constants = self.nodes, self.inputs, self.outputs, self.constants
        if shared:
            replacements = {id(portable): make for portable, _, make in self.shared_attention}
            dropped = {id(node) for _, replaced, _ in self.shared_attention for node in replaced}
            nodes = self.shared_setup + [replacements[id(n)]() if id(n) in replacements else n for n in self.nodes
                      if id(n) in replacements or id(n) not in dropped]
            presents = {n for _, _, make in self.shared_attention for n in make().output[1:]}
            inputs = [_with_axis(i, self.shared_inputs.get(i.name, 0), "capacity") for i in self.inputs
                      if self.shared_inputs.get(i.name, 0) is not None]
            outputs = [_with_axis(o, 2, "capacity") if o.name in presents else o for o in self.outputs]
            used = {name for node in nodes for name in node.input}  # the replaced nodes' constants go with them
            constants = [c for c in self.constants if c.name in used]
        graph = helper.make_graph(nodes, self.name, inputs, outputs, initializer=constants)
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            producer_name="xmtf-onnx",
        )
        model.ir_version = 8
        return model


def _with_axis(value: onnx.ValueInfoProto, axis: int, name: str) -> onnx.ValueInfoProto:
    """A copy of value with one axis renamed (the others kept): [batch, heads, total, d] -> capacity."""
    if not axis:
        return value
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(value)
    copy.type.tensor_type.shape.dim[axis].ClearField("dim_value")
    copy.type.tensor_type.shape.dim[axis].dim_param = name
    return copy


# ---- quantization of one tensor (or one block of rows) ----

def quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """weight [out, in] -> (int8 [out, in], scale [out]): symmetric, one scale per output channel."""
    scales = np.abs(weight).max(axis=1) / np.float32(127)
    scales[scales == 0] = 1.0
    quantized = np.clip(np.rint(weight / scales[:, None]), -127, 127).astype(np.int8)
    return quantized, scales.astype(np.float32)


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """weight [N, K] (rows = output features) -> MatMulNBits' (blocks [N, K/block, block*bits/8] uint8,
    scales [N, K/block] fp32), symmetric with the default zero point (onnxruntime's own quantizer: the value of
    largest magnitude maps to -2^(bits-1) exactly). GatherBlockQuantized reads the same layout."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, depth = weight.shape
    blocks = -(-depth // block_size)
    packed = np.zeros((rows, blocks, block_size * bits // 8), np.uint8)
    scales = np.zeros(rows * blocks, np.float32)
    zero_points = np.zeros(rows * blocks, np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, np.ascontiguousarray(weight.T, dtype=np.float32), scales, zero_points, block_size, rows, depth,
             True)
    return packed, scales.reshape(rows, blocks)


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, bits: int, depth: int) -> np.ndarray:
    """The inverse of quantize_blocks (what MatMulNBits and GatherBlockQuantized compute with) -> [N, depth]."""
    rows, blocks = scales.shape
    if bits == 4:
        values = np.empty((rows, packed.shape[1], packed.shape[2] * 2), np.int16)
        values[..., 0::2] = packed & 0x0F
        values[..., 1::2] = packed >> 4
        values -= 8
    else:
        values = packed.astype(np.int16) - 128
    return (values * scales[:, :, None]).reshape(rows, -1)[:, :depth].astype(np.float32)


def check_quantized(weights: WeightFile, name: str, source_rows: np.ndarray, key: str, start: int,
                    bits: int | None = None, transposed: bool = True) -> float:
    """Read rows [start, start + n) of a quantized tensor back from disk, dequantize them as onnxruntime will, and
    compare with the source rows: the error must stay within one quantization step (the rounding bound of both
    formats), so a wrong offset, layout or packing fails the export. Records the worst ratio in weights.checks."""
    count, depth = source_rows.shape
    if bits is None:  # per-channel int8, stored transposed [in, out] (a MatMul weight) or as rows [V, d] (a table)
        written = np.asarray(weights.read(key))
        written = (written[:, start:start + count].T if transposed else written[start:start + count]).astype(np.float32)
        scales = np.asarray(weights.read(key + ".scale")).reshape(-1)[start:start + count]
        step = np.abs(scales)[:, None]
        error = np.abs(written * scales[:, None] - source_rows)
    else:
        packed = np.asarray(weights.read(key))[start:start + count]
        blocks = packed.shape[1]
        scales = np.asarray(weights.read(key + ".scales")).reshape(-1)[start * blocks:(start + count) * blocks]
        scales = scales.reshape(count, blocks)
        error = np.abs(dequantize_blocks(packed, scales, bits, depth) - source_rows)
        block_size = packed.shape[2] * 8 // bits
        step = np.repeat(np.abs(scales), block_size, axis=1)[:, :depth]
    ratio = np.divide(error, step, out=np.zeros_like(error), where=step > 0)
    ratio[(step == 0) & (error > 0)] = np.inf
    worst = float(ratio.max()) if ratio.size else 0.0
    weights.checks[name] = max(weights.checks.get(name, 0.0), worst)
    return worst


# ---- 2-D weights written in blocks of rows: the [V, d] tables, and every MatMul weight ----

def _chunks(source, name: str):
    return source.chunks(name, rows_per_chunk(source.shape(name)[1]))


def fp32_table(weights: WeightFile, key: str, source, name: str) -> str:
    """The table as fp32 rows under `key` (written once)."""
    if key not in weights.placements:
        weights.reserve(key, np.float32, source.shape(name))
        start = 0
        for rows in _chunks(source, name):
            weights.write_rows(key, start, rows)
            start += len(rows)
    return key


def block_table(weights: WeightFile, key: str, source, name: str, bits: int, block_size: int) -> str:
    """The table in MatMulNBits' symmetric blocks under key.q{bits}b{block} (+ .scales), written once: the tied
    head's MatMulNBits and the embedding's GatherBlockQuantized read the same bytes."""
    base = f"{key}.q{bits}b{block_size}"
    if base not in weights.placements:
        vocab, depth = source.shape(name)
        blocks = -(-depth // block_size)
        weights.reserve(base, np.uint8, (vocab, blocks, block_size * bits // 8))
        weights.reserve(base + ".scales", np.float32, (vocab, blocks))
        start = 0
        for rows in _chunks(source, name):
            packed, scales = quantize_blocks(rows, bits, block_size)
            weights.write_rows(base, start, packed)
            weights.write_rows(base + ".scales", start, scales)
            check_quantized(weights, name, rows, base, start, bits)
            start += len(rows)
    return base


def int8_rows_table(weights: WeightFile, key: str, source, name: str) -> str:
    """The [V, d] table as int8 rows, one scale per row (+ QGemm's zero points, all 0): the output projection's
    QGemm (transB) and the embedding's Gather read the same bytes, so a tied table is stored once."""
    base = f"{key}.int8rows"
    if base not in weights.placements:
        vocab, depth = source.shape(name)
        weights.reserve(base, np.int8, (vocab, depth))
        weights.reserve(base + ".scale", np.float32, (vocab,))
        weights.reserve(base + ".zero", np.int8, (vocab,))
        weights.write_rows(base + ".zero", 0, np.zeros(vocab, np.int8))
        start = 0
        for rows in _chunks(source, name):
            quantized, scales = quantize_per_channel(rows)
            weights.write_rows(base, start, quantized)
            weights.write_rows(base + ".scale", start, scales)
            check_quantized(weights, name, rows, base, start, transposed=False)
            start += len(rows)
    return base


def int8_rows_lookup(table: str, scales: str, ids: str, output: str) -> list[onnx.NodeProto]:
    """The rows of an int8 [V, d] table for ids [batch, seq], each times its row's scale (`scales` [V, 1]) -> `output`
    [batch, seq, d] fp32: the embedding over the rows a tied int8-dynamic head's QGemm reads (int8_rows_table), as
    the builder and `xmtf-onnx quantize` write it."""
    return [helper.make_node("Gather", [table, ids], [output + ".int8"], name=output + ".gather", axis=0),
            helper.make_node("Cast", [output + ".int8"], [output + ".float"], name=output + ".cast",
                             to=TensorProto.FLOAT),
            helper.make_node("Gather", [scales, ids], [output + ".scale"], name=output + ".gather_scale", axis=0),
            helper.make_node("Mul", [output + ".float", output + ".scale"], [output], name=output + ".scaled")]


def int8_columns_table(weights: WeightFile, key: str, source, name: str) -> str:
    """A MatMul weight [out, in] stored transposed, [in, out] int8, one scale per output feature
    (DynamicQuantizeMatMul's layout), written a block of rows at a time."""
    base = f"{key}.int8"
    if base not in weights.placements:
        out_features, in_features = source.shape(name)
        weights.reserve(base, np.int8, (in_features, out_features))
        weights.reserve(base + ".scale", np.float32, (out_features,))
        start = 0
        for rows in _chunks(source, name):
            quantized, scales = quantize_per_channel(rows)
            weights.write_columns(base, start, quantized.T)
            weights.write_rows(base + ".scale", start, scales)
            check_quantized(weights, name, rows, base, start)
            start += len(rows)
    return base


def fp32_columns(weights: WeightFile, key: str, source, name: str) -> str:
    """A MatMul weight [out, in] stored transposed, [in, out] fp32, written a block of rows at a time."""
    if key not in weights.placements:
        out_features, in_features = source.shape(name)
        weights.reserve(key, np.float32, (in_features, out_features))
        start = 0
        for rows in _chunks(source, name):
            weights.write_columns(key, start, rows.T)
            start += len(rows)
    return key


# ---- writing the graphs ----

def save_graph(folder: str, graph: Graph, filename: str, shared: bool = False) -> None:
    """Write a graph whose initializers point into the (already written) weight files (shared: its shared-buffer
    form, over the same weights)."""
    model = graph.to_model(shared)
    for name, (weight_file, key, shape) in graph.initializers.items():
        model.graph.initializer.append(weight_file.tensor(name, key, shape))
    path = os.path.join(folder, filename)
    with open(path, "wb") as handle:
        handle.write(model.SerializeToString())
    onnx.checker.check_model(path)


def save_graphs(folder: str, graphs: Iterable[tuple[Graph, str]]) -> None:
    for graph, filename in graphs:
        save_graph(folder, graph, filename)


SHARED_SUFFIX = "_shared"


def save_forms(folder: str, graphs: list[tuple[Graph, str, str]]) -> dict[str, dict]:
    """Write each (graph, filename, role), and the shared-buffer form of a graph that has one (role and file name
    + _shared, over the same weights): {role: {"filename", "inputs", "outputs"}} of every file written."""
    written = {}
    for graph, filename, role in graphs:
        forms = [(False, filename, role)]
        if graph.has_shared_form:
            forms.append((True, filename.replace(".onnx", SHARED_SUFFIX + ".onnx"), role + SHARED_SUFFIX))
        for shared, name, form_role in forms:
            save_graph(folder, graph, name, shared)
            model = graph.to_model(shared).graph
            written[form_role] = {"filename": name, "inputs": [i.name for i in model.input],
                                  "outputs": [o.name for o in model.output]}
    return written


def shared_buffer_fields(role: str) -> dict:
    """The manifest's record of a shared-buffer graph (cache.shared_buffer): what the runtime must do with it."""
    return {
        "graph_role": role + SHARED_SUFFIX, "providers": ["cpu"], "capacity_axis": 2,
        "op": "com.microsoft.GroupQueryAttention",
        "contract": "a layer's past and present are one buffer [batch, heads, capacity, head_dim], bound as both "
                    "input and output; the node writes this step's keys and values at positions total - new .. "
                    "total - 1 (total: the attention_mask's width) and reads the first total; there is no "
                    "beam_idx input: the caller reorders the rows between steps",
    }
