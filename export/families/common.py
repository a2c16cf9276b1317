"""Helpers shared by the family modules: the cache contract, the embedding table, the output graphs."""

from __future__ import annotations

import math

import numpy as np

from ..graph import (PAGE, SHARED_SUFFIX, MS_DOMAIN, Graph, Placement, WeightFile, WeightPlan, block_table, fp32_table,
                     int8_columns_table, int8_rows_lookup, int8_rows_table)
from ..weights import WeightSource

HEAD_WEIGHT = "lm_head"  # the output projection's name for keep-fp32 patterns, tied or not


class Store:
    """The weight files of one export folder, created on first use and written as the graphs are built."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files: dict[str, WeightFile] = {}

    def file(self, name: str) -> WeightFile:
        if name not in self.files:
            self.files[name] = WeightFile(name).bind(self.folder)
        return self.files[name]


def cache_fields(num_layers: int, num_heads: int, head_dim: int) -> dict:
    """The self-attention KV cache contract: recorded, never derived by the runtime."""
    return {
        "num_layers": num_layers,
        "num_heads": num_heads,
        "head_dim": head_dim,
        "dtype": "float32",
        "axes": ["batch", "heads", "sequence", "head_dim"],
        "past_key": "past_key.{layer}",
        "past_value": "past_value.{layer}",
        "present_key": "present_key.{layer}",
        "present_value": "present_value.{layer}",
        "reorder_input": "beam_idx",
        # Each past is read once, by the Gather that reorders it for beam search, into a buffer of its own, before
        # the present is written: the runtime may bind a layer's present to its past's memory (one cache, not two).
        "present_may_overwrite_past": True,
    }


def compare(onnx_value: np.ndarray, torch_value, where: np.ndarray | None = None) -> dict[str, float]:
    """Max abs difference and the reference's max abs value (the scale the tolerance is relative to)."""
    reference = torch_value.detach().numpy() if hasattr(torch_value, "detach") else np.asarray(torch_value)
    if onnx_value.shape != reference.shape:
        return {"max_abs_diff": float("inf"), "max_abs_reference": 0.0,
                "error": f"shape {list(onnx_value.shape)} != PyTorch's {list(reference.shape)}"}
    difference = np.abs(onnx_value.astype(np.float64) - reference.astype(np.float64))
    magnitude = np.abs(reference.astype(np.float64))
    if where is not None:
        difference, magnitude = difference[where], magnitude[where]
    if not difference.size:
        return {"max_abs_diff": 0.0, "max_abs_reference": 0.0}
    return {"max_abs_diff": float(difference.max()), "max_abs_reference": float(magnitude.max())}


def embedding(graph: Graph, ids: str, source: WeightSource, name: str, weights: WeightFile, key: str,
              tied: bool = False) -> str:
    """Rows of the [V, d] table `name` for ids [batch, seq] -> [batch, seq, d] fp32: an fp32 Gather, or
    GatherBlockQuantized over the plan's blocks (8-bit blocks for int8-dynamic), the bytes of the weight-only
    modes' MatMulNBits head; int8-dynamic with the head `tied` to the table: a Gather of the int8 rows its QGemm
    reads, scaled per row. A tied table is stored once."""
    plan = graph.plan
    vocab, depth = source.shape(name)
    if not plan.quantizes(key):
        if plan.mode != "fp32":
            graph.kept_fp32.append(key)
        table = graph.refer(key, weights, fp32_table(weights, key, source, name))
        return graph.op("Gather", [table, ids], axis=0)
    graph.quantized.append(key)
    if plan.mode == "int8-dynamic" and tied:
        base = int8_rows_table(weights, key, source, name)
        scales = graph.refer(base + ".scale", weights, base + ".scale", (vocab, 1))
        return graph.extend(int8_rows_lookup(graph.refer(base, weights, base), scales, ids, base + ".rows"))
    bits = plan.bits
    base = block_table(weights, key, source, name, bits, plan.block_size)
    blocks = weights.placements[base + ".scales"].shape[1]
    data = graph.refer(base, weights, base, (vocab, blocks * plan.block_size * bits // 8))
    scales = graph.refer(base + ".scales", weights, base + ".scales")
    rows = graph.op("GatherBlockQuantized", [data, ids, scales], domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                    block_size=plan.block_size, bits=bits)
    if blocks * plan.block_size != depth:  # the last block is zero-padded
        rows = graph.op("Slice", [rows, graph.const([0]), graph.const([depth]), graph.const([-1])])
    return rows


HEAD_BLOCK_BYTES = 64 << 20  # the most bytes of a head onnxruntime packs as one weight (see head_row_blocks)


def head_row_blocks(*tables: Placement) -> list[tuple[int, int]]:
    """Row ranges splitting the head's tables (same rows, [V, ...] each) into MatMuls of at most HEAD_BLOCK_BYTES.
    onnxruntime packs each weight into a copy of its own and releases the mapped original once it is packed, so a
    load holds one weight twice at a time: the whole head (bloomz-560m 1 GB in fp32, 160 MB in int4; bloomz-7b1 640 MB
    in int4) set its peak RSS. Each range starts on a page of every table, so onnxruntime still memory-maps it. A
    head of at most two blocks stays one MatMul: the Concat of the blocks' logits costs a copy and, while it runs, a
    second buffer of logits (bloomz-560m int4 at 8x4 beams: +50 MB of peak RSS and 3% of the step, for 120 MB less
    at load)."""
    vocab = tables[0].shape[0]
    rows_per_page = max(PAGE // math.gcd(PAGE, t.length // vocab) for t in tables)  # rows whose bytes fill pages
    row_bytes = sum(t.length // vocab for t in tables)
    if row_bytes * vocab <= 2 * HEAD_BLOCK_BYTES:
        return [(0, vocab)]
    step = max(rows_per_page, HEAD_BLOCK_BYTES // row_bytes // rows_per_page * rows_per_page)
    return [(start, min(vocab, start + step)) for start in range(0, vocab, step)]


def joined(graph: Graph, parts: list[str]) -> str:
    """The outputs of a projection's row blocks (head_row_blocks), side by side."""
    return parts[0] if len(parts) == 1 else graph.op("Concat", parts, axis=-1)


def row_blocks(weights: WeightFile, keys: tuple[str, ...], small: tuple[str, ...] = ()) -> list[tuple[int, list[str]]]:
    """The head's tables `keys` then `small` (same rows) in head_row_blocks -> per block (its rows, the keys of its
    views; the tables themselves for a head of one block). The blocks start on pages of `keys`; `small` tables
    (QGemm's zero points) are too small to be memory-mapped and do not constrain them."""
    vocab = weights.placements[keys[0]].shape[0]
    blocks = head_row_blocks(*(weights.placements[k] for k in keys))
    if blocks == [(0, vocab)]:
        return [(vocab, [*keys, *small])]
    return [(stop - start, [weights.rows_view(k, start, stop) for k in (*keys, *small)]) for start, stop in blocks]


def output_graphs(hidden_size: int, source: WeightSource, name: str, weights: WeightFile, key: str,
                  plan: WeightPlan, tied: bool = False) -> list:
    """The head (hidden -> logits) over the [V, d] projection `name`, stored as the plan says, and, when the head
    is fp32, the greedy screen over the same fp32 rows. `key` names the table in `weights`; `tied`: it is the
    embedding's (see embedding()), whose bytes the head reads: fp32 rows (Gemm, transB), MatMulNBits blocks, or
    for int8-dynamic int8 rows (QGemm, transB: DynamicQuantizeMatMul needs them transposed, a second copy), in
    row blocks (head_row_blocks). An untied int8-dynamic head is one DynamicQuantizeMatMul: QGemm transposes its
    weight while packing, a third copy at load that only blocks bound."""
    from onnx import TensorProto

    from ..screen import build_screen

    vocab = source.shape(name)[0]
    head = Graph("head", weights, plan)
    hidden = head.input("hidden", TensorProto.FLOAT, ["batch", hidden_size])
    refer = lambda table: head.refer(table, weights, table)  # noqa: E731
    parts = []
    if plan.quantizes(HEAD_WEIGHT):
        head.quantized.append(HEAD_WEIGHT)
        if plan.mode == "int8-dynamic" and not tied:
            base = int8_columns_table(weights, key, source, name)
            parts.append(head.op("DynamicQuantizeMatMul", [hidden, refer(base), refer(base + ".scale")],
                                 domain=MS_DOMAIN))
        elif plan.mode == "int8-dynamic":  # DynamicQuantizeMatMul's own quantization of hidden, then QGemm per block
            base = int8_rows_table(weights, key, source, name)
            quantized = head.op("DynamicQuantizeLinear", [hidden], outputs=3)
            for _, (table, scale, zero) in row_blocks(weights, (base, base + ".scale"), (base + ".zero",)):
                parts.append(head.op("QGemm", [*quantized, refer(table), refer(scale), refer(zero)], domain=MS_DOMAIN,
                                     transB=1))
        else:
            base = block_table(weights, key, source, name, plan.bits, plan.block_size)
            blocks = weights.placements[base + ".scales"].shape[1]
            for rows, (table, scales) in row_blocks(weights, (base, base + ".scales")):
                parts.append(head.op("MatMulNBits", [hidden, refer(table),
                                                     head.refer(scales, weights, scales, (rows * blocks,))],
                                     domain=MS_DOMAIN, K=hidden_size, N=rows, bits=plan.bits,
                                     block_size=plan.block_size, accuracy_level=4))
        head.output(joined(head, parts), "logits", TensorProto.FLOAT, ["batch", vocab])
        return [(head, "head.onnx", "head")]
    if plan.mode != "fp32":
        head.kept_fp32.append(HEAD_WEIGHT)
    table = fp32_table(weights, key, source, name)
    for _, (rows,) in row_blocks(weights, (table,)):  # Gemm with transB reads PyTorch's [V, d] layout
        parts.append(head.op("Gemm", [hidden, refer(rows)], transB=1))
    head.output(joined(head, parts), "logits", TensorProto.FLOAT, ["batch", vocab])
    screen = build_screen(source, name, weights, key, WeightFile("screen.onnx.data").bind(weights.folder))
    return [(head, "head.onnx", "head"), (screen, "screen.onnx", "screen")]


def decoder_forms(sessions: dict) -> list[str]:
    """The decoder graphs written (the portable one, and its shared-buffer form where there is one)."""
    return [role for role in ("decoder", "decoder" + SHARED_SUFFIX) if role in sessions]


def run_decoder(sessions: dict, role: str, feeds: dict[str, np.ndarray], past: dict[str, np.ndarray],
                presents: dict[str, str]) -> dict[str, np.ndarray]:
    """One step of either decoder form: feeds (all but the cache), past {input: [batch, heads, length, d]},
    presents {past input: its present output} -> every output by name, presents [batch, heads, length + new, d].
    The shared-buffer form gets buffers with room to spare (capacity > total), as the runtime gives it."""
    import onnxruntime as ort

    session = sessions[role]
    names = [o.name for o in session.get_outputs()]
    if role == "decoder":
        return dict(zip(names, session.run(None, {**feeds, **past})))
    binding = session.io_binding()
    for name, array in feeds.items():
        if name != "beam_idx":  # the caller reorders: here every row continues its own
            binding.bind_cpu_input(name, array)
    length, new = next(iter(past.values())).shape[2], feeds["input_ids"].shape[1]
    buffers = {}
    for name, array in past.items():
        buffer = np.zeros((*array.shape[:2], length + new + 3, array.shape[3]), array.dtype)
        buffer[:, :, :length] = array
        value = ort.OrtValue.ortvalue_from_numpy(buffer)
        binding.bind_ortvalue_input(name, value)
        binding.bind_ortvalue_output(presents[name], value)
        buffers[presents[name]] = buffer
    others = [name for name in names if name not in buffers]
    for name in others:
        binding.bind_output(name, "cpu")
    session.run_with_iobinding(binding)
    out = {name: value.numpy() for name, value in zip(others, binding.get_outputs()[len(buffers):])}
    out.update({name: buffer[:, :, :length + new] for name, buffer in buffers.items()})
    return out


def cache_names(fields: dict) -> dict[str, str]:
    """{past input: present output} of every layer, from the manifest's cache fields."""
    cache = fields["cache"]
    return {cache[f"past_{part}"].format(layer=i): cache[f"present_{part}"].format(layer=i)
            for i in range(cache["num_layers"]) for part in ("key", "value")}


def head_logits(sessions: dict, hidden: np.ndarray, diffs: dict, check: str) -> np.ndarray:
    """The head's logits for hidden [batch, d]; checks the greedy screen on the same rows into diffs[check].

    The screen's bound is a guarantee, not an approximation: a row whose logit exceeds it fails the export."""
    from ..errors import ValidationError

    logits = sessions["head"].run(None, {"hidden": hidden})[0]  # [batch, V]
    if "screen" in sessions:
        count = min(16, logits.shape[1] - 1)
        ids, exact, rest = sessions["screen"].run(None, {"hidden": hidden, "candidates": np.array([count])})
        diffs[check] = compare(exact, np.take_along_axis(logits, ids, axis=1))
        others = logits.copy()
        np.put_along_axis(others, ids, -np.inf, axis=1)
        if not (others.max(axis=1) <= rest).all():
            raise ValidationError(f"the greedy screen's bound {rest.tolist()} is below a logit outside its "
                                  f"candidates ({others.max(axis=1).tolist()}); please report this.")
    return logits
