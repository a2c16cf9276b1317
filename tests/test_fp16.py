"""The fp16 variant keeps mT5's overflowing FFN outputs in fp32: finite where plain fp16 is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmtf_onnx.benchmarks.fidelity import compare_variant
from xmtf_onnx.runtime import load

FP16_MAX = 65504.0


@pytest.fixture(scope="module")
def overflowing_mt5(mt5_checkpoint, tmp_path_factory):
    """The tiny mT5 with FFN weights scaled up so that its residual stream leaves fp16's range, as mT5's does."""
    from transformers import AutoModelForSeq2SeqLM

    from xmtf_onnx.export import export

    model = AutoModelForSeq2SeqLM.from_pretrained(mt5_checkpoint).eval()
    with torch.no_grad():
        for block in [*model.encoder.block, *model.decoder.block]:
            feed_forward = block.layer[-1].DenseReluDense
            for linear in (feed_forward.wi_0, feed_forward.wi_1, feed_forward.wo):
                linear.weight.mul_(40.0)
    folder = tmp_path_factory.mktemp("overflow")
    model.save_pretrained(folder / "checkpoint")
    exported = export(str(folder / "checkpoint"), str(folder / "export"), quantize=["fp16"], progress=False)
    return model, exported


def test_the_model_really_overflows_fp16(overflowing_mt5):
    model, _ = overflowing_mt5
    ids = torch.tensor([[5, 9, 33, 17, 80, 41, 2]])
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=torch.tensor([[0, 7, 8]]), output_hidden_states=True)
    peak = max(float(h.abs().max()) for h in (*out.encoder_hidden_states, *out.decoder_hidden_states))
    with np.errstate(over="ignore"):
        assert peak > FP16_MAX and np.isinf(np.float16(peak))  # these activations are inf in fp16


def test_fp16_variant_computes_its_matmuls_in_fp16(overflowing_mt5):
    import onnx

    _, exported = overflowing_mt5
    for role in ("encoder", "decoder"):
        graph = onnx.load(f"{exported}/fp16/{role}.onnx", load_external_data=False).graph
        half = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
        full = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
        matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in half | full]
        assert sum(n.input[1] in half for n in matmuls) > sum(n.input[1] in full for n in matmuls) > 0
        assert all(n.input[1].endswith("DenseReluDense.wo") for n in matmuls if n.input[1] in full)
        # no fp32 -> fp16 -> fp32 round trip is left between two fp32 nodes
        producers = {o: n for n in graph.node for o in n.output}
        for node in graph.node:
            source = producers.get(node.input[0]) if node.input else None
            assert not (node.op_type == "Cast" and source is not None and source.op_type == "Cast"), node.name


def test_fp16_variant_is_finite_and_close_to_fp32(overflowing_mt5):
    _, exported = overflowing_mt5
    fp32, fp16 = load(exported), load(exported, variant="fp16")
    quantization = fp16.manifest.variant("fp16")["quantization"]
    assert quantization["weight_type"] == "float16" and quantization["kept_fp32"]["weights"]["decoder"]
    rows = [[5, 9, 33, 17, 80, 41], [120, 7, 64, 3]]
    targets = fp32.generate(input_ids=rows, max_new_tokens=8, min_new_tokens=8).sequences
    for step in fp16.teacher_forced(rows, targets):  # [batch, vocab] log-probs, computed through fp16 MatMuls
        assert np.isfinite(step).all()
    fidelity = compare_variant(fp32, fp16, rows, new_tokens=8)
    assert fidelity["top1_agreement"] >= 0.9 and fidelity["mean_kl"] < 1e-2
    beams = fp16.generate(input_ids=rows, max_new_tokens=6, num_beams=3)
    assert all(np.isfinite(beams.scores))
