"""The streaming exporter: checkpoint formats and dtypes, quantized-only folders, reduced validation, broken shards."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from xmtf_onnx.export import ModelLoadError, export
from xmtf_onnx.export.weights import (CheckpointError, CheckpointSource, RandomSource, bf16_to_float32,
                                      float32_to_bf16, write_checkpoint)
from xmtf_onnx.runtime import ManifestError, load
from xmtf_onnx.runtime.manifest import read_manifest

PROMPTS = [[5, 9, 33, 17, 80, 41], [120, 7, 64]]


def _auto(checkpoint: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    seq2seq = AutoConfig.from_pretrained(checkpoint).is_encoder_decoder
    return AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM


def _resave(checkpoint: Path, target: Path, dtype: torch.dtype, safe: bool, shard: str | None) -> Path:
    """The same model saved by transformers in another format: dtype on disk, safetensors or .bin, sharded."""
    model = _auto(checkpoint).from_pretrained(checkpoint, dtype=torch.float32).to(dtype)
    model.save_pretrained(target, safe_serialization=safe, **({"max_shard_size": shard} if shard else {}))
    for name in os.listdir(checkpoint):  # tokenizer files
        if not name.startswith(("model", "pytorch_model", "config")):
            shutil.copy(checkpoint / name, target / name)
    return target


def _transformers_greedy(checkpoint: Path, rows: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers.generate, one row at a time (no padding question), on the checkpoint read as fp32."""
    model = _auto(checkpoint).from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    for row in rows:
        ids = torch.tensor([row])
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, num_beams=1)
        out.append(generated[0, 0 if model.config.is_encoder_decoder else len(row):].tolist())
        if model.config.is_encoder_decoder:
            out[-1] = out[-1][1:]  # drop the decoder start token
    return out


@pytest.mark.parametrize("layout", ["safetensors-shards", "bin-shards", "bin-single"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpoint_formats_export_and_generate_like_transformers(family, tmp_path, layout, dtype):
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    shard = None if layout == "bin-single" else "40KB"
    checkpoint = _resave(family["checkpoint"], tmp_path / "ckpt", torch_dtype, layout.startswith("safetensors"), shard)
    files = os.listdir(checkpoint)
    if shard:
        assert any(name.endswith(".index.json") for name in files), files
    output = export(str(checkpoint), tmp_path / "out", progress=False)
    manifest = read_manifest(output).data
    assert manifest["validation"]["mode"] == "full" and manifest["validation"]["performed"]
    expected = _transformers_greedy(checkpoint, PROMPTS, 6)
    got = load(output).generate(input_ids=PROMPTS, max_new_tokens=6, min_new_tokens=6, output_scores=False)
    assert got.sequences == expected


def test_safetensors_without_index_and_bf16_read_exactly(family, tmp_path):
    """Several shards and no index file; bf16 on disk read back as exactly the fp32 values torch sees."""
    checkpoint = _resave(family["checkpoint"], tmp_path / "ckpt", torch.bfloat16, True, "40KB")
    model = _auto(checkpoint).from_pretrained(checkpoint, dtype=torch.bfloat16)
    os.remove(checkpoint / "model.safetensors.index.json")
    source = CheckpointSource(str(checkpoint))
    for name, tensor in model.state_dict().items():
        if name in source:
            np.testing.assert_array_equal(source.get(name), tensor.float().numpy(), err_msg=name)
    output = export(str(checkpoint), tmp_path / "out", progress=False)
    assert read_manifest(output).data["validation"]["performed"]


def test_quantized_only_folder_runs_and_says_so(family, tmp_path):
    output = export(str(family["checkpoint"]), tmp_path / "out", quantize=["int4-weight"], fp32=False, progress=False)
    manifest = read_manifest(output).data
    assert list(manifest["variants"]) == ["int4-weight"] and manifest["default_variant"] == "int4-weight"
    assert not os.path.exists(os.path.join(output, "decoder.onnx"))  # no fp32 graphs written
    assert "greedy_screen" not in manifest
    quantization = manifest["variants"]["int4-weight"]["quantization"]
    assert quantization["written_from"].startswith("the checkpoint") and quantization["quantized_weights"] > 0
    checks = manifest["validation"]["quantized_weights"]["int4-weight"]
    assert 0 < checks["worst"]["steps"] <= 1.0 and checks["tensors"] == len(checks["per_tensor"])
    assert "scratch" in manifest["validation"]["what"]
    model = load(output)  # the default variant
    assert model.variant == "int4-weight"
    assert len(model.generate(input_ids=PROMPTS, max_new_tokens=4, num_beams=2).sequences) == 2


@pytest.mark.parametrize("variant", ["int8-dynamic", "int8-weight", "int4-weight"])
def test_a_tied_table_is_stored_once(bloom_checkpoint, variant, tmp_path):
    """BLOOM's output projection is its embedding: the head's quantized rows (QGemm / MatMulNBits) are the very
    bytes the decoder's embedding gathers from, so the variant holds the table once."""
    import onnx

    output = export(str(bloom_checkpoint), tmp_path / "out", quantize=[variant], fp32=False, progress=False)
    folder = os.path.join(output, variant)

    def where(graph_file: str, name: str) -> tuple[str, int, int]:
        tensor = next(t for t in onnx.load(os.path.join(folder, graph_file), load_external_data=False).graph.initializer
                      if t.name == name)
        info = {entry.key: entry.value for entry in tensor.external_data}
        return info["location"], int(info["offset"]), int(info["length"])

    decoder = onnx.load(os.path.join(folder, "decoder.onnx"), load_external_data=False).graph
    gather = next(n for n in decoder.node if n.op_type in ("Gather", "GatherBlockQuantized") and n.input[1] == "input_ids")
    location, start, length = where("decoder.onnx", gather.input[0])
    head = onnx.load(os.path.join(folder, "head.onnx"), load_external_data=False).graph
    weights = [n.input[3] if n.op_type == "QGemm" else n.input[1] for n in head.node
               if n.op_type in ("QGemm", "MatMulNBits")]
    ranges = sorted(where("head.onnx", name) for name in weights)
    assert {r[0] for r in ranges} == {location}
    assert ranges[0][1] == start and sum(r[2] for r in ranges) == length  # the head's rows cover the table, once
    files = sorted(os.listdir(folder))
    assert not any(name.startswith("head.onnx.") for name in files), files  # the head has no data of its own
    if variant == "int8-dynamic":
        assert "shared with the head" in read_manifest(output).variant(variant)["quantization"]["embedding"]
    assert load(output).generate(input_ids=PROMPTS, max_new_tokens=3).sequences


def test_quantized_only_needs_a_built_mode(family, tmp_path):
    from xmtf_onnx.export import ExportError

    with pytest.raises(ExportError, match="needs a quantized one"):
        export(str(family["checkpoint"]), tmp_path / "out", fp32=False, progress=False)
    with pytest.raises(ExportError, match="fp16"):
        export(str(family["checkpoint"]), tmp_path / "out", quantize=["int8", "fp16"], fp32=False, progress=False)
    assert os.listdir(tmp_path) == []


def test_reduced_validation_records_its_probes(tmp_path, monkeypatch):
    from conftest import build_mt5

    checkpoint = build_mt5(tmp_path / "ckpt", num_decoder_layers=3, with_tokenizer=False)
    output = export(str(checkpoint), tmp_path / "together", validation="reduced", progress=False)
    validation = read_manifest(output).data["validation"]
    assert validation["mode"] == "reduced" and "full model was not compared" in validation["what"]
    assert [p["layers"] for p in validation["probes"]] == [{"encoder": [0, 1], "decoder": [0, 2]}]
    assert any("with_past" in name for name in validation["probes"][0]["outputs"])
    # Over the memory budget: each layer alone (the last layer's probe reads block 0's relative attention bias).
    import xmtf_onnx.export.validation as validation_module

    monkeypatch.setattr(validation_module, "PROBE_BUDGET_BYTES", 0)
    output = export(str(checkpoint), tmp_path / "apart", validation="reduced", progress=False)
    probes = read_manifest(output).data["validation"]["probes"]
    assert [p["layers"] for p in probes] == [{"encoder": [0], "decoder": [0]}, {"encoder": [1], "decoder": [2]}]


def test_reduced_validation_fails_on_a_wrong_graph(bloom_checkpoint, tmp_path, monkeypatch):
    """The probes compare real outputs: a builder bug (here, one layer norm's epsilon) is caught."""
    from xmtf_onnx.export import ValidationError
    from xmtf_onnx.export.families import bloom

    original = bloom._norm
    monkeypatch.setattr(bloom, "_norm", lambda graph, x, name, w, eps, skip=None: original(graph, x, name, w, eps * 1e5,
                                                                                          skip))
    with pytest.raises(ValidationError, match="probe"):
        export(str(bloom_checkpoint), tmp_path / "out", validation="reduced", progress=False)
    assert os.listdir(tmp_path) == []


def _sharded(checkpoint: Path, target: Path) -> Path:
    return _resave(checkpoint, target, torch.float32, True, "40KB")


def test_broken_checkpoints_are_typed_errors_and_write_nothing(mt5_checkpoint, tmp_path):
    cases = {}
    truncated = _sharded(mt5_checkpoint, tmp_path / "truncated")
    shard = sorted(p for p in truncated.iterdir() if p.name.startswith("model-"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    cases["truncated"] = (truncated, "truncated or corrupted")
    missing = _sharded(mt5_checkpoint, tmp_path / "missing")
    os.remove(sorted(p for p in missing.iterdir() if p.name.startswith("model-"))[-1])
    cases["missing"] = (missing, "missing")
    index_names_missing = _sharded(mt5_checkpoint, tmp_path / "index")
    index_path = index_names_missing / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["shared.weight"] = "model-00099-of-00099.safetensors"
    index_path.write_text(json.dumps(index))
    cases["index"] = (index_names_missing, "model-00099-of-00099.safetensors")
    wrong_shape = tmp_path / "shape"
    shutil.copytree(mt5_checkpoint, wrong_shape)
    from safetensors.numpy import load_file, save_file

    tensors = load_file(wrong_shape / "model.safetensors")
    tensors["encoder.block.1.layer.0.SelfAttention.q.weight"] = np.zeros((7, 40), np.float32)
    save_file(tensors, wrong_shape / "model.safetensors", metadata={"format": "pt"})
    cases["shape"] = (wrong_shape, r"encoder.block.1.layer.0.SelfAttention.q.weight is \[7, 40\]")
    for name, (checkpoint, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            export(str(checkpoint), tmp_path / f"out-{name}", progress=False)
        assert not (tmp_path / f"out-{name}").exists(), name
    assert issubclass(CheckpointError, ModelLoadError) and issubclass(CheckpointError, ValueError)
    assert not [p for p in os.listdir(tmp_path) if p.startswith((".out", "out"))]


def test_random_source_slices_are_reproducible_and_scaled():
    source = RandomSource({"w": ((9000, 8), ("normal", 0.5)), "n": ((8,), ("ones",))}, seed=3)
    whole = source.get("w")
    np.testing.assert_array_equal(source.rows("w", 4000, 8500), whole[4000:8500])  # across a row block
    assert abs(whole.std() - 0.5) < 0.01
    np.testing.assert_array_equal(source.get("n"), np.ones(8, np.float32))
    assert not np.array_equal(RandomSource(source.parameters, seed=4).get("w"), whole)


def test_write_checkpoint_round_trips_through_transformers(tmp_path):
    """A preset-style checkpoint streamed to bf16 shards reads back (by transformers too) as the rounded source."""
    from xmtf_onnx.export.families import FAMILIES
    from xmtf_onnx.export.presets import preset_config  # noqa: F401  (the presets use the same path)
    from transformers import BloomConfig

    config = BloomConfig(vocab_size=300, hidden_size=32, n_layer=2, n_head=4)
    source = RandomSource(FAMILIES["bloom"].parameters(config), seed=1)
    files = write_checkpoint(source, source.names(), str(tmp_path), "bfloat16", shard_bytes=20_000)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    config.save_pretrained(tmp_path)
    written = CheckpointSource(str(tmp_path))
    for name in source.names():
        np.testing.assert_array_equal(written.get(name), bf16_to_float32(float32_to_bf16(source.get(name))))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    np.testing.assert_array_equal(model.transformer.h[1].mlp.dense_4h_to_h.weight.detach().numpy(),
                                  written.get("transformer.h.1.mlp.dense_4h_to_h.weight"))


def test_export_quantize_keeps_what_it_is_told_and_records_it(family, tmp_path):
    """keep_fp32 at export: the kept MatMuls stay fp32 (a kept head brings its greedy screen); the defaults per mode."""
    output = export(str(family["checkpoint"]), tmp_path / "out", quantize=["int8", "int4-weight"],
                    keep_fp32=("lm_head",), progress=False)
    manifest = read_manifest(output).data
    for name in ("int8-dynamic", "int4-weight"):
        variant = manifest["variants"][name]
        assert variant["quantization"]["kept_fp32"] == {"patterns": ["lm_head"],
                                                        "weights": {**{r: [] for r in variant["files"]
                                                                       if r not in ("head", "screen", "decoder_shared")},
                                                                    "head": ["lm_head"]}}
        assert "screen" in variant["files"]
        assert load(output, variant=name).generate(input_ids=PROMPTS, max_new_tokens=3).sequences
    defaults = export(str(family["checkpoint"]), tmp_path / "defaults", quantize=["int8", "int4-weight"], fp32=False,
                      progress=False)
    variants = read_manifest(defaults).data["variants"]
    kept = [w for ws in variants["int8-dynamic"]["quantization"]["kept_fp32"]["weights"].values() for w in ws]
    assert bool(kept) == (family["name"] == "mt5") and all(w.endswith("DenseReluDense.wo") for w in kept)
    assert not any(variants["int4-weight"]["quantization"]["kept_fp32"]["weights"].values())


def test_the_name_typed_at_export_loads(family, tmp_path):
    """--quantize int8 writes int8-dynamic; `int8` loads it too, and load() takes a quantized-only folder's own."""
    output = export(str(family["checkpoint"]), tmp_path / "out", quantize=["int8"], fp32=False, progress=False)
    assert read_manifest(output).data["aliases"] == {"int8": "int8-dynamic"}
    by_alias, by_default = load(output, variant="int8"), load(output)
    assert by_alias.variant == by_default.variant == "int8-dynamic"
    assert (by_alias.generate(input_ids=PROMPTS, max_new_tokens=3).sequences
            == by_default.generate(input_ids=PROMPTS, max_new_tokens=3).sequences)
    with pytest.raises(ManifestError, match=r"no variant 'int4-weight'; it has int8-dynamic, int8 \(= int8-dynamic\)"):
        load(output, variant="int4-weight")


@pytest.mark.parametrize("variant", ["fp32", "int8-dynamic", "int4-weight"])
def test_a_large_head_is_written_in_row_blocks(family, variant, tmp_path, monkeypatch):
    """A head above 2 x HEAD_BLOCK_BYTES becomes several Gemm / QGemm / MatMulNBits over page-aligned row ranges of the one
    stored table (onnxruntime then holds one block twice while packing, not the whole head): the same logits and
    tokens as one node (fp32: the greedy screen's exact rows too), a restricted variant keeps the base head's rows,
    and `xmtf-onnx quantize` of an fp32 folder in blocks gives the head it gives from one Gemm."""
    import onnx

    from xmtf_onnx.export import screen
    from xmtf_onnx.export.families import common
    from xmtf_onnx.export.quantize import quantize_folder
    from xmtf_onnx.export.restrict import restrict

    checkpoint = family["checkpoint"]
    if variant == "int8-dynamic":  # int8 rows of a tied table (QGemm): their scales fill a page in 1024 rows
        if family["name"] == "mt5":
            pytest.skip("an untied int8-dynamic head is one DynamicQuantizeMatMul (QGemm's packing would copy it)")
        from conftest import build_bloom

        checkpoint = build_bloom(tmp_path / "ckpt", with_tokenizer=False, vocab_size=2100)
    options = dict(quantize=[variant], fp32=False, block_size=32) if variant != "fp32" else {}
    monkeypatch.setattr(screen, "BLOCK_SIZE", 32)  # the screen's 8-bit copy then fills pages in fewer rows than V
    whole = export(str(checkpoint), tmp_path / "whole", progress=False, **options)
    monkeypatch.setattr(common, "HEAD_BLOCK_BYTES", 1)  # blocks of the fewest rows that fill whole pages
    blocks = export(str(checkpoint), tmp_path / "blocks", progress=False, **options)
    folder = "" if variant == "fp32" else variant
    head = onnx.load(os.path.join(blocks, folder, "head.onnx"), load_external_data=False).graph
    parts = [node for node in head.node if node.op_type in ("Gemm", "QGemm", "MatMulNBits")]
    vocab = read_manifest(blocks).tokens["vocab_size"]
    # d = 40: fp32 rows fill a page in 128 rows; int4 scales (blocks of 32: 2 a row) in 512; int8 scales (1 a row) in 1024
    rows_per_block = {"fp32": 128, "int8-dynamic": 1024, "int4-weight": 512}[variant]
    assert len(parts) == -(-vocab // rows_per_block) > 1 and [n.op_type for n in head.node].count("Concat") == 1
    one, split = load(whole, variant=variant), load(blocks, variant=variant)
    hidden = np.random.default_rng(0).standard_normal((3, one.runner.sessions["head"].get_inputs()[0].shape[1]))
    hidden = hidden.astype(np.float32)
    np.testing.assert_allclose(split.runner.logits(hidden), one.runner.logits(hidden), rtol=1e-6, atol=1e-6)
    for generation in (dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=3)):
        assert split.generate(input_ids=PROMPTS, **generation).sequences == \
            one.generate(input_ids=PROMPTS, **generation).sequences
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(map(str, sorted(set(range(0, vocab, 3)) | {0, 1, 2, 3}))))
    restrict(str(blocks), "r", token_ids=str(ids), variant=variant)
    restricted = load(blocks, variant="r")
    np.testing.assert_allclose(restricted.runner.logits(hidden),
                               split.runner.logits(hidden)[:, restricted.runner.vocabulary.ids], rtol=1e-6, atol=1e-6)
    if variant == "fp32":  # the greedy screen's 8-bit copy is in blocks too, and certifies the same
        screen = onnx.load(os.path.join(blocks, "screen.onnx"), load_external_data=False).graph
        assert [n.op_type for n in screen.node].count("MatMulNBits") > 1
        for expected, got in zip(one.runner.screen(hidden, 8), split.runner.screen(hidden, 8)):
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        assert split.generate(input_ids=PROMPTS, max_new_tokens=6).metrics["screened_rows"] > 0
        for target in (whole, blocks):
            quantize_folder(str(target), "int4-weight")
        quantized = [load(target, variant="int4-weight").runner.logits(hidden) for target in (whole, blocks)]
        np.testing.assert_array_equal(quantized[1], quantized[0])
