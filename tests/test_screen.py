"""The greedy screen's guarantee: its bound is above every logit it leaves out, on hostile inputs too."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from xmtf_onnx.export.families.common import output_graphs
from xmtf_onnx.export.graph import WeightFile, WeightPlan, save_graphs
from xmtf_onnx.export.screen import quantize_rows
from xmtf_onnx.export.weights import ArraySource
from xmtf_onnx.runtime.generation import GenerationConfig, StepTimer, greedy_tokens


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """A 3000 x 72 projection (d not a multiple of the block) with rows of very different scales."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((3000, 72)).astype(np.float32) * rng.uniform(0.01, 3.0, (3000, 1)).astype(np.float32)
    weight[7] = 0.0  # an all-zero row (scale guard)
    weight[11, 5] = 40.0  # one outlier weight dominates its block
    folder = tmp_path_factory.mktemp("screen")
    graphs = output_graphs(72, ArraySource({"w": weight}), "w", WeightFile("head.onnx.data").bind(str(folder)), "w",
                           WeightPlan())
    save_graphs(str(folder), [(graph, filename) for graph, filename, _ in graphs])
    return (weight, ort.InferenceSession(str(folder / "head.onnx")), ort.InferenceSession(str(folder / "screen.onnx")))


def _hostile_hidden(rng, rows: int = 64) -> np.ndarray:
    hidden = rng.standard_normal((rows, 72)).astype(np.float32)
    hidden[::4, 3] *= 200.0  # one huge activation: int8 activation error is large for the rest of the row
    hidden[1::4] *= 1e-3
    hidden[2::4] = rng.uniform(-1, 1, (len(hidden[2::4]), 72)) * 1e3
    hidden[3::4, :70] = 0.0  # almost all zero
    return hidden


@pytest.mark.parametrize("candidates", [1, 4, 64])
def test_bound_covers_every_left_out_logit(screen, candidates):
    weight, head, screen_session = screen
    hidden = _hostile_hidden(np.random.default_rng(candidates))
    logits = head.run(None, {"hidden": hidden})[0]
    exact64 = hidden.astype(np.float64) @ weight.T.astype(np.float64)
    ids, exact, rest = screen_session.run(None, {"hidden": hidden, "candidates": np.array([candidates])})
    assert ids.shape == exact.shape == (64, candidates) and rest.shape == (64,)
    np.testing.assert_allclose(exact, np.take_along_axis(logits, ids, axis=1), rtol=1e-5, atol=1e-4)
    left_out = exact64.copy()
    np.put_along_axis(left_out, ids, -np.inf, axis=1)
    assert (left_out.max(axis=1) <= rest).all()
    # where the screen certifies, its pick is the true argmax
    certified = exact.max(axis=1) > rest
    assert certified.any()
    picked = np.take_along_axis(ids, exact.argmax(axis=1)[:, None], axis=1)[:, 0]
    assert (picked[certified] == exact64.argmax(axis=1)[certified]).all()


def test_quantized_rows_are_within_half_a_step():
    weight = np.random.default_rng(1).standard_normal((50, 70)).astype(np.float32)
    for size in (32, 128):  # 70 columns: three blocks of 32 (the last padded), or one of 128
        blocks, scales, dequantized = quantize_rows(weight, size)
        count = -(-70 // size)
        assert blocks.dtype == np.uint8 and blocks.shape == (50, count, size) and scales.shape == (50, count)
        step = np.repeat(scales, size, axis=1)[:, :70]
        assert (np.abs(weight - dequantized) <= step / 2 + 1e-7).all()


class _FakeRunner:
    """Candidates with a tie and a row the bound cannot certify."""

    has_screen = True
    screen_candidates = 3
    vocabulary = None  # a full head

    def screen(self, hidden, candidates):
        ids = np.array([[9, 4, 6], [1, 2, 3]])
        exact = np.array([[5.0, 5.0, 1.0], [2.0, 1.0, 0.0]], np.float32)
        return ids, exact, np.array([4.0, 2.5], np.float32)

    def logits(self, hidden):
        scores = np.zeros((hidden.shape[0], 10), np.float32)
        scores[:, 8] = 3.0
        return scores


def test_ties_take_the_lowest_id_and_uncertified_rows_use_the_full_logits():
    config = GenerationConfig(max_new_tokens=1, min_new_tokens=0, eos_token_id=(0,), pad_token_id=0, stop_strings=(),
                              num_beams=1, length_penalty=1.0, early_stopping=False, num_return_sequences=1,
                              no_repeat_ngram_size=0, repetition_penalty=1.0, do_sample=False, temperature=1.0,
                              top_k=50, top_p=1.0, seed=None, output_scores=False)
    timer = StepTimer()
    tokens = greedy_tokens(_FakeRunner(), np.zeros((2, 4), np.float32), np.zeros((2, 1), np.int64), 0, config, timer)
    assert tokens.tolist() == [4, 8]
    assert (timer.screened_rows, timer.full_rows) == (1, 1)


@pytest.mark.parametrize("outliers", [False, True], ids=["gaussian", "outliers"])
def test_bound_holds_where_quantization_decides_the_order(tmp_path, outliers):
    """Near-identical rows: their true logits differ far less than the quantization error, so the approximate
    order is noise and only the bound terms keep the (K+1)-th bound above the rows left out (without them both
    cases fail; the activation term alone covers the weight error here, being twice what round-to-nearest needs)."""
    rng = np.random.default_rng(2)
    base = rng.standard_normal(64).astype(np.float32)
    weight = (base + rng.standard_normal((3000, 64)).astype(np.float32) * 0.02)
    graphs = output_graphs(64, ArraySource({"w": weight}), "w", WeightFile("head.onnx.data").bind(str(tmp_path)),
                           "w", WeightPlan())
    save_graphs(str(tmp_path), [(graph, filename) for graph, filename, _ in graphs])
    session = ort.InferenceSession(str(tmp_path / "screen.onnx"))
    hidden = rng.standard_normal((64, 64)).astype(np.float32)
    if outliers:
        hidden[:, 0] = 300.0 * np.sign(hidden[:, 0])
    ids, exact, rest = session.run(None, {"hidden": hidden, "candidates": np.array([2000])})
    left_out = hidden.astype(np.float64) @ weight.T.astype(np.float64)
    np.put_along_axis(left_out, ids, -np.inf, axis=1)
    assert (left_out.max(axis=1) <= rest).all()
