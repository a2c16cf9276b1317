"""The greedy screen: an exact argmax of the output projection that reads a quarter of its bytes.

Greedy decoding needs only the best token, not all logits. The screen graph takes the decoder's
hidden state h and computes, for every vocabulary row r,

    approx_r = h . q_r          8-bit block-quantized copy q_r of the fp32 row w_r (MatMulNBits,
                                activations quantized to int8 inside the kernel)
    upper_r  = approx_r + |h| * |w_r - q_r| + delta(h) * |q_r|

where |.| is the Euclidean norm and delta(h) = sqrt(d) * max|h_i| / 127 bounds the error of any
int8 quantization of h (at most one step, max|h| / 127, per element), plus a float-rounding term.
By Cauchy-Schwarz upper_r >= h . w_r for every row. The K rows with the largest upper bounds are
recomputed exactly from the fp32 weights; the graph returns their ids, their exact logits, and
the (K+1)-th largest upper bound, which bounds every other row's logit. When the best exact logit
of the candidates (after the logits processors, which only lower logits) is above that bound,
it is the argmax of the full logits; otherwise the runtime computes the full logits for that row.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .graph import MS_DOMAIN, Graph, WeightFile
from .weights import WeightSource

# Blocks of 128 rather than 32: the one-row kernel runs faster (mt0-small fp32 1x1 +12-16%) and certification barely
# moves (random presets, 16 prompts x 48 tokens: mt0-small 99.3% of rows against 99.7%, bloomz-560m 100% at both).
BLOCK_SIZE = 128
BITS = 8
ZERO_POINT = 1 << (BITS - 1)  # MatMulNBits' default zero point for unsigned 8-bit storage
FLOAT_ROUNDING = 1.2e-7  # per term of a float32 dot product: |error| <= d * this * |h| * |q_r|
DEFAULT_CANDIDATES = 128  # 95% of steps certified at 64 on mt0-small's random preset, 100% at 256


def screen_fields() -> dict:
    """What the manifest records about the screen."""
    return {"weight_bits": BITS, "block_size": BLOCK_SIZE, "default_candidates": DEFAULT_CANDIDATES,
            "bound": f"|h| |w_r - q_r| + (sqrt(d) max|h| / 127 + d * {FLOAT_ROUNDING} |h|) |q_r|",
            "exact": "argmax of the fp32 head's logits when certified; full logits otherwise"}


def quantize_rows(weight: np.ndarray, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """weight [V, d] fp32 -> (blocks [V, n_blocks, block_size] uint8, scales [V, n_blocks] fp32, dequantized [V, d]).

    Symmetric 8-bit per block of block_size along d (the last block zero-padded), stored offset by 128."""
    rows, depth = weight.shape
    blocks = -(-depth // block_size)
    padded = np.zeros((rows, blocks * block_size), np.float32)
    padded[:, :depth] = weight
    padded = padded.reshape(rows, blocks, block_size)
    scales = np.abs(padded).max(axis=2) / np.float32(127)  # [V, n_blocks]
    scales[scales == 0] = 1.0
    quantized = np.clip(np.rint(padded / scales[:, :, None]), -127, 127)
    dequantized = (quantized * scales[:, :, None]).reshape(rows, -1)[:, :depth].astype(np.float32)
    return (quantized + ZERO_POINT).astype(np.uint8), scales.astype(np.float32), dequantized


def _norm_up(x: np.ndarray) -> np.ndarray:
    """Row norms in float64, rounded up to the next float32 (a bound must not shrink in rounding)."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    as32 = norms.astype(np.float32)
    return np.where(as32 < norms, np.nextafter(as32, np.float32(np.inf)), as32).astype(np.float32)


def build_screen(source: WeightSource, name: str, table_file: WeightFile, table_key: str, screen_file: WeightFile,
                 chunk: int = 1 << 16) -> Graph:
    """The screen graph over the output projection `name` [V, d] (PyTorch layout) of `source`, whose fp32 rows are
    read from table_file under table_key (the head graph's own copy: nothing is stored twice); the screen's 8-bit
    copy and norms go to screen_file, written a block of rows at a time.

    inputs: hidden [batch, d] fp32, candidates int64 [1] (K, at most V - 1)
    outputs: candidate_ids [batch, K] int64, candidate_logits [batch, K] fp32 (exact),
             rest_bound [batch] fp32 (>= the logit of every row not among the candidates)
    """
    vocab, depth = source.shape(name)
    graph = Graph("greedy_screen", screen_file)
    blocks = -(-depth // BLOCK_SIZE)
    screen_file.reserve("screen.weight_q8", np.uint8, (vocab, blocks, BLOCK_SIZE))
    screen_file.reserve("screen.scales", np.float32, (vocab * blocks,))
    weight_error, row_norm = np.empty(vocab, np.float32), np.empty(vocab, np.float32)
    for start in range(0, vocab, chunk):  # bounded temporaries on a 250k x 4096 projection
        rows = source.rows(name, start, min(vocab, start + chunk))
        q, s, dequantized = quantize_rows(rows, BLOCK_SIZE)
        screen_file.write_rows("screen.weight_q8", start, q)
        screen_file.write_rows("screen.scales", start * blocks, s.reshape(-1))
        weight_error[start:start + chunk] = _norm_up(rows.astype(np.float64) - dequantized)
        row_norm[start:start + chunk] = _norm_up(dequantized)

    hidden = graph.input("hidden", TensorProto.FLOAT, ["batch", depth])
    candidates = graph.input("candidates", TensorProto.INT64, [1])
    from .families.common import head_row_blocks, joined

    parts = []  # the 8-bit copy is the largest weight of an fp32 model's load: in row blocks as the head (see there)
    for start, stop in head_row_blocks(*(screen_file.placements[k] for k in ("screen.weight_q8", "screen.scales"))):
        whole = (start, stop) == (0, vocab)
        table = "screen.weight_q8" if whole else screen_file.rows_view("screen.weight_q8", start, stop)
        scales = "screen.scales" if whole else screen_file.rows_view("screen.scales", start * blocks, stop * blocks)
        parts.append(graph.op("MatMulNBits", [hidden, graph.refer(table, screen_file, table),
                                              graph.refer(scales, screen_file, scales)],
                              domain=MS_DOMAIN, K=depth, N=stop - start, bits=BITS, block_size=BLOCK_SIZE,
                              accuracy_level=4))
    approx = joined(graph, parts)  # [batch, V]
    norm = graph.op("Sqrt", [graph.op("ReduceSumSquare", [hidden], axes=[-1], keepdims=1)])  # [batch, 1]
    peak = graph.op("ReduceMax", [graph.op("Abs", [hidden])], axes=[-1], keepdims=1)  # [batch, 1]
    delta = graph.op("Add", [graph.op("Mul", [peak, graph.const(np.float32(np.sqrt(depth) / 127), np.float32)]),
                             graph.op("Mul", [norm, graph.const(np.float32(depth * FLOAT_ROUNDING), np.float32)])])
    upper = graph.op("Add", [approx, graph.op("Mul", [norm, graph.weight("screen.weight_error", weight_error)])])
    upper = graph.op("Add", [upper, graph.op("Mul", [delta, graph.weight("screen.row_norm", row_norm)])])
    one = graph.const([1])
    top_values, top_ids = graph.op("TopK", [upper, graph.op("Add", [candidates, one])], outputs=2, axis=-1,
                                   largest=1, sorted=1)
    ids = graph.op("Slice", [top_ids, graph.const([0]), candidates, one])  # [batch, K]
    rest = graph.op("Slice", [top_values, candidates, graph.op("Add", [candidates, one]), one])  # [batch, 1]
    rows = graph.op("Gather", [graph.refer(table_key, table_file, table_key), ids], axis=0)  # [batch, K, d]
    exact = graph.op("MatMul", [rows, graph.op("Unsqueeze", [hidden, graph.const([2])])])  # [batch, K, 1]
    graph.output(ids, "candidate_ids", TensorProto.INT64, ["batch", "candidates"])
    graph.output(graph.op("Squeeze", [exact, graph.const([2])]), "candidate_logits", TensorProto.FLOAT,
                 ["batch", "candidates"])
    graph.output(graph.op("Squeeze", [rest, one]), "rest_bound", TensorProto.FLOAT, ["batch"])
    return graph
