"""Export: manifest contract, parity recorded, sizes, atomicity, refusal to overwrite, typed errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from xmtf_onnx.export import ExportError, ModelLoadError, OutputExistsError, UnsupportedModelError, export
from xmtf_onnx.export.exporter import folder_size
from xmtf_onnx.export.families import FAMILIES
from xmtf_onnx.runtime.manifest import read_manifest, sha256_of

from conftest import TESTED_FAMILIES, build_mt5


def test_families_are_tested():
    assert set(FAMILIES) == set(TESTED_FAMILIES), "every registered family needs fixtures in conftest.py"


def test_manifest_records_the_contract(family):
    manifest = read_manifest(family["export"]).data
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(family["checkpoint"])
    assert manifest["format_version"] == 4
    assert manifest["family"] == family["name"]
    cache = manifest["cache"]
    if family["name"] == "mt5":
        assert manifest["kind"] == "seq2seq"
        assert cache["head_dim"] == config.d_kv == 16  # not d_model // num_heads (13)
        assert cache["num_heads"] == 3 and cache["num_layers"] == config.num_decoder_layers
        assert manifest["cross_cache"]["head_dim"] == 16
        assert manifest["tokens"]["decoder_start_token_id"] == 0
        assert set(manifest["variants"]["fp32"]["files"]) == {"encoder", "decoder", "decoder_shared", "head", "screen"}
    else:
        assert manifest["kind"] == "decoder"
        assert cache["num_heads"] == 5 and cache["head_dim"] == 8
        assert set(manifest["variants"]["fp32"]["files"]) == {"decoder", "decoder_shared", "head", "screen"}
    # the decoder's shared-buffer form: the same weights (one data file), GroupQueryAttention, no beam_idx, and
    # validated against PyTorch like the portable form
    files = manifest["variants"]["fp32"]["files"]
    assert files["decoder_shared"]["data"] == files["decoder"]["data"]
    assert cache["shared_buffer"]["graph_role"] == "decoder_shared"
    shared = onnx.load(str(family["export"] / files["decoder_shared"]["path"]), load_external_data=False).graph
    assert [node.op_type for node in shared.node].count("GroupQueryAttention") == cache["num_layers"]
    assert {node.op_type for node in shared.node if any(n.startswith("past_") for n in node.input)} == {
        "GroupQueryAttention"}  # the cache is neither reordered nor copied in the graph
    assert "beam_idx" not in {i.name for i in shared.input}
    assert {"decoder_shared.logits.no_past", "decoder_shared.logits.with_past"} <= set(manifest["validation"]["outputs"])
    assert cache["axes"] == ["batch", "heads", "sequence", "head_dim"]
    assert manifest["tokens"]["eos_token_id"] == [config.eos_token_id]
    assert manifest["tokens"]["vocab_size"] == config.vocab_size
    assert manifest["tokenizer"]["vocab_size"] < config.vocab_size  # logits are wider, as in the real models
    assert os.path.isfile(family["export"] / "tokenizer.json")
    assert os.path.isfile(family["export"] / "config.json")
    assert os.path.isfile(family["export"] / "generation_config.json")
    for entry in manifest["variants"]["fp32"]["files"].values():
        for item in [entry, *entry["data"]]:
            assert sha256_of(str(family["export"] / item["path"])) == item["sha256"]
    validation = manifest["validation"]
    assert validation["performed"]
    assert any("with_past" in name for name in validation["outputs"])
    for name, result in validation["outputs"].items():
        assert result["max_abs_diff"] <= 1e-4 * max(1.0, result["max_abs_reference"]), name


def _screen_bytes(manifest: dict) -> int:
    """What the greedy screen adds by design: an 8-bit copy of the [V, d] projection in blocks (the manifest's
    block size) with fp32 scales, and two fp32 norms per row (plus alignment)."""
    size = manifest["greedy_screen"]["block_size"]
    blocks = -(-manifest["hidden_size"] // size)
    return manifest["tokens"]["vocab_size"] * (blocks * size + blocks * 4 + 8) + 4 * 64


def _unique_files(manifest: dict, variant: str = "fp32") -> dict[str, int]:
    return {item["path"]: item["bytes"] for entry in manifest["variants"][variant]["files"].values()
            for item in [entry, *entry["data"]]}


def test_folder_size_bounds(family):
    """No weight stored twice: BLOOM <= 1.05x, mT0 <= 1.5x the fp32 parameter bytes (JSON and tokenizer aside),
    besides the greedy screen's 8-bit copy of the output projection."""
    manifest = read_manifest(family["export"]).data
    files = _unique_files(manifest)
    screen = files.pop("screen.onnx.data")
    assert screen <= _screen_bytes(manifest)
    parameters = manifest["num_parameters"] * 4
    bound = 1.5 if family["name"] == "mt5" else 1.05
    # The graph files of a tiny model carry per-node overhead a real one does not; the weights alone must fit.
    data_bytes = sum(size for path, size in files.items() if not path.endswith(".onnx"))
    assert data_bytes <= bound * parameters
    assert sum(files.values()) <= bound * parameters + 64_000


@pytest.mark.slow
@pytest.mark.parametrize("preset, bound", [("mt0-small", 1.01), ("bloomz-560m", 1.01)])
def test_preset_folder_size(preset, bound, tmp_path):
    output = export(f"preset:{preset}", tmp_path / preset, progress=False)
    manifest = read_manifest(output).data
    size = folder_size(output) - os.path.getsize(os.path.join(output, "tokenizer.json"))  # the synthetic one
    assert size <= bound * manifest["num_parameters"] * 4 + _screen_bytes(manifest), (size, manifest["num_parameters"])


def test_decoder_layers_differ_from_encoder_layers(tmp_path):
    checkpoint = build_mt5(tmp_path / "ckpt", num_decoder_layers=3, with_tokenizer=False)
    output = export(str(checkpoint), tmp_path / "out", progress=False)
    manifest = read_manifest(output).data
    assert manifest["cache"]["num_layers"] == 3 and manifest["tokenizer"] is None
    assert len([n for n in manifest["io"]["encoder"]["outputs"] if n.startswith("cross_key")]) == 3


def test_refuses_to_overwrite_then_force_replaces(family, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        export(str(family["checkpoint"]), target, progress=False)
    assert (target / "keep.txt").read_text() == "mine"
    export(str(family["checkpoint"]), target, force=True, progress=False, validate=False)
    assert not (target / "keep.txt").exists()
    assert read_manifest(target).data["validation"] == {"mode": "none", "performed": False}
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left behind


def test_failure_mid_export_leaves_nothing(family, tmp_path, monkeypatch):
    family_module = FAMILIES[family["name"]]

    def broken_validate(*args, **kwargs):
        raise RuntimeError("simulated crash while validating")

    from dataclasses import replace

    monkeypatch.setitem(FAMILIES, family["name"], replace(family_module, validate=broken_validate))
    with pytest.raises(RuntimeError, match="simulated"):
        export(str(family["checkpoint"]), tmp_path / "out", progress=False)
    assert os.listdir(tmp_path) == []


def test_validation_failure_is_typed_and_writes_nothing(family, tmp_path):
    from xmtf_onnx.export import ValidationError

    with pytest.raises(ValidationError, match="disagree with PyTorch"):
        export(str(family["checkpoint"]), tmp_path / "out", tolerance=1e-15, progress=False)
    assert os.listdir(tmp_path) == []


def test_missing_folder_is_a_typed_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        export(str(tmp_path / "nope"), tmp_path / "out", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        export(str(empty), tmp_path / "out", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["empty"]


def test_unsupported_model_type(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        export(str(tmp_path / "gpt2"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unreadable_checkpoint(mt5_checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((mt5_checkpoint / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError):
        export(str(broken), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_preset_and_bad_tolerance(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown preset"):
        export("preset:mt0-tiny", tmp_path / "out", progress=False)
    with pytest.raises(ExportError, match="tolerance"):
        export("preset:mt0-small", tmp_path / "out", tolerance=-1, progress=False)
    assert os.listdir(tmp_path) == []


def test_cli_export_errors_exit_nonzero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "xmtf_onnx.runtime.cli", "export", str(tmp_path / "missing"),
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1  # the rule in --help: 1 could not be done, 2 a wrong command line
    assert "error:" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "out").exists()
    usage = subprocess.run([sys.executable, "-m", "xmtf_onnx.runtime.cli", "export", "--no-such-flag"],
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def test_offline_model_id_fails_fast(tmp_path, monkeypatch):
    """With the Hub unreachable (HF_HUB_OFFLINE, or one quick connection attempt) a model id that is not cached
    fails at once with a message that says so, not after the Hub client's retries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelLoadError, match="not reachable from here .* not in the local cache"):
        export("some-org/not-a-model", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_spiece_model_becomes_tokenizer_json_that_decodes_like_transformers(mt5_checkpoint, mt5_export):
    from transformers import AutoTokenizer

    from xmtf_onnx.runtime import load

    assert not (mt5_checkpoint / "tokenizer.json").exists()  # the checkpoint has spiece.model only
    reference = AutoTokenizer.from_pretrained(mt5_checkpoint, use_fast=False)
    model = load(mt5_export)
    from conftest import sample_prompts

    for text in sample_prompts(8):
        ids = reference(text).input_ids
        assert model.tokenizer.encode(text).ids == ids
        assert model.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    rng = np.random.default_rng(0)
    for _ in range(5):
        ids = rng.integers(0, len(reference), size=12).tolist()
        assert model.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_graph_logits_match_pytorch_on_a_padded_batch(bloom_checkpoint, bloom_export):
    """Independent of export's own validation: a fresh padded batch through onnxruntime directly."""
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bloom_checkpoint).eval()
    manifest = read_manifest(bloom_export).data
    session = ort.InferenceSession(str(bloom_export / "decoder.onnx"))
    ids = np.array([[3, 3, 3, 10, 11, 12], [20, 21, 22, 23, 24, 25]], dtype=np.int64)
    mask = (ids != 3).astype(np.int64)
    cache = manifest["cache"]
    feeds = {"input_ids": ids, "attention_mask": mask, "beam_idx": np.arange(2)}
    for i in range(cache["num_layers"]):
        feeds[f"past_key.{i}"] = feeds[f"past_value.{i}"] = np.zeros((2, cache["num_heads"], 0, cache["head_dim"]),
                                                                      np.float32)
    hidden = session.run(["hidden"], feeds)[0]
    logits = ort.InferenceSession(str(bloom_export / "head.onnx")).run(["logits"], {"hidden": hidden})[0]
    with torch.no_grad():
        reference = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits[:, -1]
    np.testing.assert_allclose(logits, reference.numpy(), atol=1e-4)


def test_manifest_is_json_with_versions(family):
    data = json.loads((family["export"] / "xmtf_manifest.json").read_text())
    assert {"torch", "transformers", "onnx", "onnxruntime"} <= set(data["versions"])
    assert data["source"]["model"] == str(family["checkpoint"])


def test_sigterm_mid_export_leaves_nothing(tmp_path):
    """A terminated export (service manager, timeout) cleans up like an interrupted one."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, "-m", "xmtf_onnx.runtime.cli", "export", "preset:mt0-small",
                                str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.startswith(".out.partial") for p in os.listdir(tmp_path)):
        time.sleep(0.2)
    assert any(p.startswith(".out.partial") for p in os.listdir(tmp_path)), "the export never started writing"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("family_name", ["mt5", "bloom"])
def test_presets_export_a_tokenizer_over_their_whole_vocabulary(tmp_path, monkeypatch, family_name):
    """Offline, a preset's text goes in and (random) text comes out: the synthetic tokenizer covers every id,
    encodes any text (byte fallback), keeps the family's special tokens at their real ids, and says it is synthetic."""
    from xmtf_onnx.export import presets
    from xmtf_onnx.runtime import load

    small = dict(d_model=32, d_ff=48, num_heads=2, d_kv=16, num_layers=1, num_decoder_layers=1) \
        if family_name == "mt5" else dict(hidden_size=32, n_layer=1, n_head=2)
    base = presets._MT5 if family_name == "mt5" else presets._BLOOM
    monkeypatch.setitem(presets.PRESETS, "tiny", dict(base, vocab_size=1500, **small))
    output = export("preset:tiny", tmp_path / "out", progress=False, validation="none")
    model = load(output)
    entry = model.manifest.data["tokenizer"]
    assert "not the model's real tokenizer" in entry["synthetic"] and model.tokenizer.get_vocab_size() == 1500
    text = "Translate to English: Кошка спит 猫 🙂"
    ids = model.tokenizer.encode(text).ids
    assert model.decode(ids) == text and max(ids) < 1500
    assert (ids[-1] == model.tokens["eos_token_id"][0]) == (family_name == "mt5")  # mT5's tokenizer appends </s>
    out = model.generate(text, max_new_tokens=6, min_new_tokens=6)
    assert out.texts[0] == model.decode(out.sequences[0]) and len(out.sequences[0]) == 6
    assert "".join(model.stream(text, max_new_tokens=6, min_new_tokens=6)) == out.texts[0]


def test_every_initializer_is_read_by_a_node(family):
    """No graph carries weights or constants that no node reads (onnxruntime warns about each at load); the
    shared-buffer form drops the constants of the nodes it replaces."""
    import onnx

    for root, _, files in os.walk(family["export"]):
        for name in (f for f in files if f.endswith(".onnx")):
            graph = onnx.load(os.path.join(root, name), load_external_data=False).graph
            read = {value for node in graph.node for value in node.input}
            unused = [t.name for t in graph.initializer if t.name not in read]
            assert not unused, f"{name}: {unused[:5]}"
