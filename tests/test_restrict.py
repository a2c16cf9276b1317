"""Restricted output vocabulary: exact against transformers (suppression for greedy, renormalised beams)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from xmtf_onnx.export import export
from xmtf_onnx.export.errors import OutputExistsError
from xmtf_onnx.export.quantize import quantize_folder
from xmtf_onnx.export.restrict import RestrictError, restrict
from xmtf_onnx.runtime import load

from conftest import sample_prompts
from test_generate import _prompts, _reference_model, transformers_generate


@pytest.fixture(scope="module")
def restricted(family_exports, tmp_path_factory):
    """Per family: an export with int8 and int4 heads, and restricted variants of each that
    leave out some of the tokens the full model picks greedily (so the restriction changes the output)."""
    made = {}
    for name in family_exports:
        folder = tmp_path_factory.mktemp("restricted") / name
        # built at export: QGemm (BLOOM's tied table) or DynamicQuantizeMatMul, and MatMulNBits heads;
        # `quantize`: MatMulInteger (onnxruntime's quantizer), QGemm for a tied table
        export(_checkpoint(family_exports, name), folder, quantize=["int8-dynamic", "int4-weight"], progress=False)
        quantize_folder(str(folder), "int8", name="int8-ort")
        model = load(folder)
        rows = _prompts({"name": name}, model, 3)
        greedy = model.generate(input_ids=rows, max_new_tokens=12, eos_token_id=[]).sequences
        picked = sorted({t for s in greedy for t in s})
        rng = np.random.default_rng(0)
        allowed = set(rng.choice(model.vocab_size, size=model.vocab_size * 2 // 5, replace=False).tolist())
        allowed -= set(picked[::2])  # half of what greedy picks is gone
        allowed |= set(picked[1::2])
        ids_file = folder.parent / f"{name}-ids.txt"
        ids_file.write_text(" ".join(map(str, sorted(allowed))))
        for variant in ("fp32", "int4-weight", "int8-dynamic", "int8-ort"):
            restrict(str(folder), f"{variant}-r", token_ids=str(ids_file), variant=variant)
        made[name] = {"folder": folder, "rows": rows, "removed": set(picked[::2])}
    return made


@pytest.fixture(scope="module")
def family_exports(mt5_export, bloom_export):
    return {"mt5": mt5_export, "bloom": bloom_export}


class KeepAndRenormalise:
    """The beam-search reference: -inf outside the kept tokens, log-probabilities renormalised over them."""

    def __init__(self, kept: np.ndarray, vocab: int):
        self.outside = torch.ones(vocab, dtype=torch.bool)
        self.outside[torch.as_tensor(kept)] = False

    def __call__(self, input_ids, scores):
        scores = scores.masked_fill(self.outside[: scores.shape[-1]], -float("inf"))
        return torch.log_softmax(scores, dim=-1)


@pytest.mark.parametrize("family_name", ["mt5", "bloom"])
@pytest.mark.parametrize("options", [dict(max_new_tokens=10), dict(max_new_tokens=8, repetition_penalty=1.3,
                                                                     no_repeat_ngram_size=2, min_new_tokens=3)],
                         ids=["greedy", "greedy-processors"])
def test_restricted_greedy_equals_transformers_with_suppression(restricted, family_exports, family_name, options):
    made = restricted[family_name]
    model = load(made["folder"], variant="fp32-r")
    kept = model.runner.vocabulary.ids
    suppressed = sorted(set(range(model.vocab_size)) - set(kept.tolist()))
    reference = _reference_model({"name": family_name, "checkpoint": _checkpoint(family_exports, family_name)})
    eos, pad = model.tokens["eos_token_id"], model.tokens["pad_token_id"]
    expected, expected_scores = transformers_generate(reference, made["rows"], model.kind, eos, pad,
                                                      suppress_tokens=suppressed, **options)
    screened = model.generate(input_ids=made["rows"], **options)  # the restricted greedy screen
    scored = model.generate(input_ids=made["rows"], output_scores=True, **options)  # the restricted full head
    assert screened.sequences == scored.sequences == expected
    assert screened.metrics["screened_rows"] > 0
    assert not any(t in made["removed"] for s in expected for t in s) and set().union(*expected) <= set(kept.tolist())
    np.testing.assert_allclose(scored.scores, expected_scores, atol=1e-3, rtol=1e-3)
    full = load(made["folder"]).generate(input_ids=made["rows"], **options).sequences
    assert full != expected  # the restriction changed what is generated


@pytest.mark.parametrize("family_name", ["mt5", "bloom"])
def test_restricted_beams_equal_transformers_renormalised(restricted, family_exports, family_name):
    from transformers import LogitsProcessorList

    made = restricted[family_name]
    model = load(made["folder"], variant="fp32-r")
    kept = model.runner.vocabulary.ids
    reference = _reference_model({"name": family_name, "checkpoint": _checkpoint(family_exports, family_name)})
    eos, pad = model.tokens["eos_token_id"], model.tokens["pad_token_id"]
    keep = LogitsProcessorList([KeepAndRenormalise(kept, model.vocab_size)])
    for options in (dict(max_new_tokens=8, num_beams=4), dict(max_new_tokens=6, num_beams=3, num_return_sequences=2,
                                                                length_penalty=0.7)):
        expected, expected_scores = transformers_generate(reference, made["rows"], model.kind, eos, pad,
                                                          logits_processor=keep, **options)
        output = model.generate(input_ids=made["rows"], **options)
        assert output.sequences == expected
        np.testing.assert_allclose(output.scores, expected_scores, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family_name", ["mt5", "bloom"])
# int8-dynamic: QGemm over the int8 rows of a head tied to the embedding (BLOOM), else DynamicQuantizeMatMul (export)
# or MatMulInteger (onnxruntime's quantizer)
@pytest.mark.parametrize("variant, head", [("int4-weight", "MatMulNBits"),
                                           ("int8-dynamic", {"mt5": "DynamicQuantizeMatMul", "bloom": "QGemm"}),
                                           ("int8-ort", {"mt5": "MatMulInteger", "bloom": "QGemm"})])
def test_restricted_quantized_head_is_the_base_heads_rows(restricted, family_name, variant, head):
    """A quantized head's stored rows are copied, so its logits are the base head's at the kept columns."""
    made = restricted[family_name]
    base, model = load(made["folder"], variant=variant), load(made["folder"], variant=f"{variant}-r")
    head = head[family_name] if isinstance(head, dict) else head
    assert model.restricted["base"] == variant and model.restricted["head"] == head
    hidden = np.random.default_rng(1).standard_normal((3, base.runner.sessions["head"].get_inputs()[0].shape[1]))
    hidden = hidden.astype(np.float32)
    np.testing.assert_allclose(model.runner.logits(hidden), base.runner.logits(hidden)[:, model.runner.vocabulary.ids],
                               rtol=1e-6, atol=1e-6)
    out = model.generate(input_ids=made["rows"], max_new_tokens=6, num_beams=2)
    assert set().union(*out.sequences) <= set(model.runner.vocabulary.ids.tolist())
    streamed = list(model.stream_tokens(made["rows"][0], max_new_tokens=6))
    assert streamed == model.generate(input_ids=made["rows"][:1], max_new_tokens=6).sequences[0]
    forced = next(model.teacher_forced(made["rows"][:1], [streamed]))  # [1, vocab]: -inf outside the kept tokens
    assert forced.shape[1] == model.vocab_size and np.isclose(np.exp(forced).sum(), 1.0, atol=1e-4)


def test_tokens_from_text_reports_coverage_and_bad_input_changes_nothing(restricted, tmp_path):
    folder = restricted["mt5"]["folder"]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sample_prompts(40)), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "xmtf_onnx.runtime.cli", "restrict", str(folder), "--name", "text",
                             "--tokens-from", str(corpus), "--variant", "int4-weight"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "added variant text" in result.stdout and "held-out tokens" in result.stdout
    model = load(folder, variant="text")
    record = model.restricted
    assert record["coverage"]["corpus_share"] == 1.0 and 0 < record["coverage"]["held_out_share"] <= 1
    kept = set(model.runner.vocabulary.ids.tolist())
    text_ids = {t for line in corpus.read_text().splitlines()[:9] for t in model.tokenizer.encode(line).ids}
    assert text_ids <= kept and set(model.tokens["eos_token_id"]) <= kept
    assert model.generate("any prompt at all", max_new_tokens=4).texts  # prompts may use any token

    before = (folder / "xmtf_manifest.json").read_text()
    entries = sorted(p.name for p in folder.iterdir())
    (tmp_path / "bad.txt").write_text("5 6 x")
    (tmp_path / "far.txt").write_text(f"5 {10 ** 9}")
    with pytest.raises(RestrictError, match="token ids separated by whitespace"):
        restrict(str(folder), "bad", token_ids=str(tmp_path / "bad.txt"))
    with pytest.raises(RestrictError, match="outside"):
        restrict(str(folder), "bad", token_ids=str(tmp_path / "far.txt"))
    with pytest.raises(RestrictError, match="one of the two"):
        restrict(str(folder), "bad")
    with pytest.raises(OutputExistsError):
        restrict(str(folder), "text", texts=[str(corpus)])
    with pytest.raises(RestrictError, match="itself restricted"):
        restrict(str(folder), "again", texts=[str(corpus)], variant="text")
    assert (folder / "xmtf_manifest.json").read_text() == before
    assert sorted(p.name for p in folder.iterdir()) == entries
    assert json.loads(before)["variants"]["text"]["files"]["vocabulary"]["path"] == "text/vocabulary.ids"


def _checkpoint(family_exports, family_name):
    """The tiny checkpoint an export came from (recorded in its manifest)."""
    manifest = json.loads((family_exports[family_name] / "xmtf_manifest.json").read_text())
    return manifest["source"]["model"]
