"""Quantized variants on the tiny models, and the benchmark suite's plumbing (no timing is asserted)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from xmtf_onnx.export.errors import ExportError, OutputExistsError
from xmtf_onnx.export.quantize import quantize_folder
from xmtf_onnx.runtime import load
from xmtf_onnx.runtime.manifest import read_manifest


@pytest.fixture(scope="module")
def quantized(family_exports, tmp_path_factory):
    folders = {}
    for name, source in family_exports.items():
        target = tmp_path_factory.mktemp("quantized") / name
        shutil.copytree(source, target)
        for mode in ("int8", "int8-weight", "int4-weight"):
            quantize_folder(str(target), mode)
        folders[name] = target
    return folders


@pytest.fixture(scope="module")
def family_exports(mt5_export, bloom_export):
    return {"mt5": mt5_export, "bloom": bloom_export}


def _teacher_forced_agreement(reference, candidate, rows, steps=12) -> float:
    """Share of decode steps where the variant's top token equals fp32's, feeding fp32's tokens to both."""
    expected = reference.generate(input_ids=rows, max_new_tokens=steps, min_new_tokens=steps).sequences
    agree = total = 0
    for row, tokens in zip(rows, expected):
        for cut in range(len(tokens)):
            if reference.kind == "decoder":
                prefix = {"input_ids": [row + tokens[:cut]]}
                step = candidate.generate(max_new_tokens=1, min_new_tokens=1, **prefix).sequences[0][0]
            else:
                state = candidate.runner.begin(np.array([row]), np.ones((1, len(row)), np.int64), 1)
                logits = candidate.runner.prefill(state)
                for token in tokens[:cut]:
                    logits = candidate.runner.decode_step(state, np.array([token]), np.array([0]))
                logits[:, candidate.tokens["eos_token_id"]] = -np.inf
                step = int(np.argmax(logits[0]))
            agree += step == tokens[cut]
            total += 1
    return agree / total


@pytest.mark.parametrize("variant, threshold", [("int8-dynamic", 0.7), ("int8-weight", 0.7), ("int4-weight", 0.4)])
@pytest.mark.parametrize("name", ["mt5", "bloom"])
def test_variant_runs_is_recorded_and_agrees(quantized, name, variant, threshold):
    folder = quantized[name]
    manifest = read_manifest(folder)
    quantization = manifest.variant(variant)["quantization"]
    assert quantization["mode"] == variant and quantization["onnxruntime"]
    assert quantization["weight_type"] == ("int4" if variant == "int4-weight" else "int8")
    fp32, model = load(folder), load(folder, variant=variant)
    rows = [[5, 9, 33, 17, 80, 41], [120, 7, 64]]
    assert len(model.generate(input_ids=rows, max_new_tokens=5, num_beams=2).sequences) == 2
    assert _teacher_forced_agreement(fp32, model, rows) >= threshold


def test_quantize_refuses_existing_variant_and_unknown_mode(quantized):
    folder = str(quantized["bloom"])
    before = (quantized["bloom"] / "xmtf_manifest.json").read_text()
    with pytest.raises(OutputExistsError):
        quantize_folder(folder, "int8")
    with pytest.raises(ExportError, match="unknown quantization mode"):
        quantize_folder(folder, "int3")
    assert (quantized["bloom"] / "xmtf_manifest.json").read_text() == before


def test_bench_plumbing_on_tiny_models(mt5_checkpoint, bloom_checkpoint, tmp_path):
    from xmtf_onnx.benchmarks.suite import main

    code = main(["--models", f"{mt5_checkpoint},{bloom_checkpoint}", "--settings", "1x1,2x2", "--backends",
                 "xmtf,pytorch", "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--quantize", "int8",
                 "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "versions", "threads", "provider", "new_tokens", "models"} <= set(report)
    for model in report["models"].values():
        names = [b["name"] for b in model["backends"]]
        assert names == ["xmtf fp32", "xmtf int8-dynamic", "pytorch fp32"]
        for backend in model["backends"]:
            assert backend["status"] == "ok", backend.get("traceback")
            assert backend["peak_rss_bytes"] > 0 and backend["size_bytes"] > 0
            for setting, entry in backend["settings"].items():
                batch = model["settings"][setting]["batch"]
                assert entry["tokens"] == batch * 4  # the generated length is forced
                assert entry["tokens_per_second"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "xmtf int8-dynamic" in table and "pytorch fp32" in table
    assert (tmp_path / "tokens_per_second.png").stat().st_size > 0 and (tmp_path / "peak_rss.png").exists()


def test_failing_rival_is_reported_not_dropped(mt5_checkpoint, tmp_path):
    from xmtf_onnx.benchmarks.report import markdown
    from xmtf_onnx.benchmarks.suite import parse_args, run_job

    args = parse_args(["--new-tokens", "2", "--repeats", "1", "--threads", "1"])
    settings = {"1x1": {"batch": 1, "beams": 1, "rows": [[5, 6, 7]]}}
    failed = run_job({"name": "ctranslate2 int8", "backend": "ctranslate2", "variant": "int8",
                      "rival_dir": str(tmp_path / "missing"), "checkpoint": str(mt5_checkpoint)}, settings, args)
    assert failed["status"] == "failed" and failed["error"]
    unprepared = run_job({"name": "optimum fp32", "prepare_error": "ValueError: head dim"}, settings, args)
    assert unprepared == {"name": "optimum fp32", "status": "failed", "error": "ValueError: head dim", "settings": {}}
    report = {"created": "now", "machine": {}, "provider": "cpu", "threads": 1, "new_tokens": 2, "prompt_tokens": "3",
              "repeats": 1, "warmup": 1, "versions": {}, "command": "x",
              "models": {"m": {"num_parameters": 1e6, "kind": "seq2seq", "settings": {"1x1": {}},
                               "backends": [failed, unprepared]}}}
    text = markdown(report)
    assert "ctranslate2 int8 | failed" in text and "optimum fp32 | failed: ValueError: head dim" in text
