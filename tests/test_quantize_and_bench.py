"""Quantized variants on the tiny models, and the benchmark suite's plumbing (no timing is asserted)."""

from __future__ import annotations

import os
import json
import shutil

import numpy as np
import pytest

from xmtf_onnx.benchmarks.fidelity import compare_variant
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
        for mode in ("int8", "int8-weight", "int4-weight", "fp16"):
            quantize_folder(str(target), mode)
        folders[name] = target
    return folders


@pytest.fixture(scope="module")
def family_exports(mt5_export, bloom_export):
    return {"mt5": mt5_export, "bloom": bloom_export}


def test_weight_only_block_sizes_default_by_family(quantized):
    """Blocks of 128 for the weight-only modes (MatMulNBits' one-row kernel is faster), but mT5's int4 keeps 32
    (4-bit blocks of 128 move its logits far more): recorded in the manifest; the graphs use what it says."""
    import onnx

    from xmtf_onnx.export.quantize import default_block_size

    expected = {("mt5", "int8-weight"): 128, ("mt5", "int4-weight"): 32, ("bloom", "int8-weight"): 128,
                ("bloom", "int4-weight"): 128}
    for (name, mode), size in expected.items():
        assert default_block_size(mode, name) == size
        variant = read_manifest(quantized[name]).variants[mode]
        assert variant["quantization"]["block_size"] == size
        graph = onnx.load(os.path.join(quantized[name], variant["files"]["decoder"]["path"]),
                          load_external_data=False).graph
        sizes = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
        assert sizes == {size}


def test_export_writes_the_family_block_size_unless_told(mt5_checkpoint, bloom_checkpoint, tmp_path):
    from xmtf_onnx.export import export

    for name, checkpoint, size in (("mt5", mt5_checkpoint, 32), ("bloom", bloom_checkpoint, 128)):
        for given, expected in ((None, size), (64, 64)):
            folder = export(str(checkpoint), tmp_path / f"{name}-{given}", progress=False, quantize=["int4-weight"],
                            fp32=False, validation="none", block_size=given)
            assert read_manifest(folder).variants["int4-weight"]["quantization"]["block_size"] == expected


@pytest.mark.parametrize("variant, threshold", [("int8-dynamic", 0.7), ("int8-weight", 0.7), ("int4-weight", 0.4),
                                                ("fp16", 0.95)])
@pytest.mark.parametrize("name", ["mt5", "bloom"])
def test_variant_runs_is_recorded_and_agrees(quantized, name, variant, threshold):
    folder = quantized[name]
    manifest = read_manifest(folder)
    quantization = manifest.variant(variant)["quantization"]
    assert quantization["mode"] == variant and quantization["onnxruntime"]
    assert quantization["weight_type"] == {"int4-weight": "int4", "fp16": "float16"}.get(variant, "int8")
    fp32, model = load(folder), load(folder, variant=variant)
    rows = [[5, 9, 33, 17, 80, 41], [120, 7, 64]]
    assert len(model.generate(input_ids=rows, max_new_tokens=5, num_beams=2).sequences) == 2
    fidelity = compare_variant(fp32, model, rows, new_tokens=12)
    assert fidelity["steps"] == 24 and fidelity["top1_agreement"] >= threshold
    assert -1e-6 < fidelity["mean_kl"] < 1.0  # ~0 when the variant matches fp32 to rounding


@pytest.mark.parametrize("name", ["mt5", "bloom"])
def test_fidelity_of_fp32_against_itself_is_exact(quantized, name):
    fp32 = load(quantized[name])
    fidelity = compare_variant(fp32, fp32, [[5, 9, 33, 17], [120, 7, 64, 3, 3]], new_tokens=6)
    assert fidelity["top1_agreement"] == 1.0 and fidelity["identical_greedy_share"] == 1.0
    assert abs(fidelity["mean_kl"]) < 1e-9


@pytest.mark.parametrize("name", ["mt5", "bloom"])
def test_teacher_forced_log_probs_are_generates_token_scores(quantized, name):
    model = load(quantized[name])
    rows = [[5, 9, 33, 17, 80, 41], [120, 7, 64]]
    out = model.generate(input_ids=rows, max_new_tokens=8, output_scores=True)  # greedy, no processor active
    steps = list(model.teacher_forced(rows, out.sequences))  # [batch, vocab] per step
    assert len(steps) == max(map(len, out.sequences))
    for row, (tokens, scores) in enumerate(zip(out.sequences, out.token_scores)):
        for step, (token, score) in enumerate(zip(tokens, scores)):
            assert int(np.argmax(steps[step][row])) == token
            assert steps[step][row][token] == pytest.approx(score, abs=1e-5)


def test_keep_fp32_patterns_are_applied_and_recorded(quantized):
    import onnx

    for name, weights in (("mt5", "lm_head"), ("bloom", "lm_head")):
        folder = quantized[name]
        quantize_folder(str(folder), "int8", keep_fp32=("lm_head",), name="int8-keep-head")
        manifest = read_manifest(folder)
        kept = manifest.variant("int8-keep-head")["quantization"]["kept_fp32"]
        assert kept["patterns"] == ["lm_head"] and kept["weights"]["head"] == [weights]
        graph = onnx.load(str(folder / "int8-keep-head" / "head.onnx"), load_external_data=False).graph
        assert any(n.op_type == "MatMul" and n.input[1] == "lm_head" for n in graph.node)
        # The head is still the fp32 projection: the variant greedy-decodes through the export's screen.
        assert manifest.variant("int8-keep-head")["files"]["screen"] == manifest.variant("fp32")["files"]["screen"]
        assert "screen" not in manifest.variant("int8-dynamic")["files"]
        default = manifest.variant("int8-dynamic")["quantization"]["kept_fp32"]
        wo = [w for ws in default["weights"].values() for w in ws]
        assert all(w.endswith("DenseReluDense.wo") for w in wo) and bool(wo) == (name == "mt5")
        assert load(folder, variant="int8-keep-head").generate(input_ids=[[5, 6, 7]], max_new_tokens=3).sequences


@pytest.mark.parametrize("name", ["mt5", "bloom"])
def test_quantize_stores_the_embedding_once_and_quantized(quantized, name):
    """`xmtf-onnx quantize` leaves no fp32 [vocab, d] table in an int8/int4 variant: one GatherBlockQuantized table
    in the variant's embeddings.bin, which every graph reading it (mT0's encoder and decoder) shares; fp16 keeps it.
    BLOOM's int8-dynamic head is tied to the table: it reads the same int8 rows (QGemm) as the embedding's Gather,
    as `export --quantize int8` writes it, rather than onnxruntime's MatMulInteger over a transposed copy."""
    import onnx

    folder = quantized[name]
    manifest = read_manifest(folder)
    vocab, depth = manifest.tokens["vocab_size"], manifest.data["hidden_size"]
    for variant, bits in (("int8-dynamic", 8), ("int8-weight", 8), ("int4-weight", 4)):
        files = manifest.variant(variant)["files"]
        tied = name == "bloom" and variant == "int8-dynamic"
        readers = 0
        for role in ("encoder", "decoder"):
            if role not in files:
                continue
            graph = onnx.load(str(folder / files[role]["path"]), load_external_data=False).graph
            tables = [t.name for t in graph.initializer
                      if list(t.dims) == [vocab, depth] and t.data_type == onnx.TensorProto.FLOAT]
            assert not tables, (variant, role, tables)
            if tied:
                int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
                assert len([n for n in graph.node if n.op_type == "Gather" and n.input[0] in int8]) == 1
            else:
                gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
                assert len(gathers) == 1 and next(a.i for a in gathers[0].attribute if a.name == "bits") == bits
            assert f"{variant}/embeddings.bin" in [d["path"] for d in files[role]["data"]]
            readers += 1
        assert readers == (2 if name == "mt5" else 1)
        embedding = manifest.variant(variant)["quantization"]["embedding"]
        assert ("shared with the head" if tied else "GatherBlockQuantized") in embedding
        if tied:
            head = onnx.load(str(folder / files["head"]["path"]), load_external_data=False).graph
            assert "QGemm" in [n.op_type for n in head.node]
            assert [d["path"] for d in files["head"]["data"]] == [f"{variant}/embeddings.bin"]
        # the graphs' own data files hold no copy of the table any more
        table_bytes = vocab * depth * 4
        own = sum(d["bytes"] for f in files.values() for d in f["data"] if not d["path"].endswith("embeddings.bin"))
        fp32_own = sum(d["bytes"] for f in manifest.variant("fp32")["files"].values() for d in f["data"])
        assert own < fp32_own - table_bytes, (variant, own, fp32_own, table_bytes)
    assert "embedding" not in manifest.variant("fp16")["quantization"]


def test_quantize_keeps_a_table_fp32_when_told(quantized):
    folder = quantized["mt5"]
    quantize_folder(str(folder), "int8-weight", keep_fp32=("shared",), name="int8-keep-table")
    entry = read_manifest(folder).variant("int8-keep-table")
    assert entry["quantization"]["kept_fp32"]["weights"]["encoder"] == ["shared"]
    assert "embedding" not in entry["quantization"] and not (folder / "int8-keep-table" / "embeddings.bin").exists()
    assert load(folder, variant="int8-keep-table").generate(input_ids=[[5, 6, 7]], max_new_tokens=3).sequences


@pytest.mark.parametrize("options, message", [({"block_size": 24}, "power of two"), ({"block_size": 8}, "power of two"),
                                              ({"name": "../x"}, "variant name"), ({"name": "fp32"}, "variant name"),
                                              ({"keep_fp32": [""]}, "non-empty")])
def test_bad_quantize_options_are_typed_errors_and_write_nothing(quantized, options, message):
    folder = quantized["mt5"]
    before = sorted(p.name for p in folder.iterdir()), (folder / "xmtf_manifest.json").read_text()
    with pytest.raises(ExportError, match=message):
        quantize_folder(str(folder), "int8-weight", force=True, **options)
    assert (sorted(p.name for p in folder.iterdir()), (folder / "xmtf_manifest.json").read_text()) == before


def test_everything_exported_is_readable_by_other_users(quantized):
    """Folders 0755 and files 0644 (not mkdtemp's 0700 / 0600): a service running as another user can load them."""
    for root, _, files in [w for folder in quantized.values() for w in os.walk(folder)]:
        assert oct(os.stat(root).st_mode & 0o777) == oct(0o755), root
        for name in files:
            assert oct(os.stat(os.path.join(root, name)).st_mode & 0o777) == oct(0o644), os.path.join(root, name)


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

    code = main(["--models", f"{mt5_checkpoint},{bloom_checkpoint}", "--settings", "1x1,2x2,2xsample", "--backends",
                 "xmtf,pytorch", "--new-tokens", "4", "--repeats", "2", "--threads", "1", "--quantize", "int8",
                 "--restrict", "300", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "versions", "threads", "provider", "new_tokens", "models", "read_bandwidth_bytes_per_second"} \
        <= set(report)
    for model in report["models"].values():
        names = [b["name"] for b in model["backends"]]
        assert names == ["xmtf fp32", "xmtf int8-dynamic", "xmtf fp32-300", "xmtf int8-dynamic-300", "pytorch fp32"]
        assert model["restricted"]["int8-dynamic-300"]["rows"] >= 300  # plus the special tokens
        assert model["decode_bytes"]["int8-dynamic-300"] < model["decode_bytes"]["int8-dynamic"]
        for backend in model["backends"]:
            assert backend["status"] == "ok", backend.get("traceback")
            assert backend["peak_rss_bytes"] > 0 and backend["size_bytes"] > 0 and backend["rss_anon_bytes"] > 0
            for setting, entry in backend["settings"].items():
                batch = model["settings"][setting]["batch"]
                assert len(entry["runs"]) == 2  # one run per round, rounds interleaved
                assert entry["tokens"] == batch * 4  # the generated length is forced
                assert entry["tokens_per_second_best"] >= entry["tokens_per_second"] > 0
        fp32 = model["backends"][0]["settings"]
        assert 0 < fp32["1x1"]["screened_share"] <= 1 and "screened_share" not in fp32["2x2"]  # beams: full logits
        assert "screened_share" not in fp32["2xsample"] and model["settings"]["2xsample"]["sample"]
        assert {"2xsample"} <= set(model["backends"][-1]["settings"])  # pytorch samples too
    table = (tmp_path / "results.md").read_text()
    assert "Greedy screen" in table and "memory roofline" in table and "Restricted-vocabulary variants" in table
    assert "xmtf int8-dynamic" in table and "pytorch fp32" in table
    for model in report["models"].values():
        fidelity = model["fidelity"]["variants"]["int8-dynamic"]
        assert fidelity["steps"] == 16 * 4 and 0.0 <= fidelity["top1_agreement"] <= 1.0
    assert "Fidelity against fp32" in table and "not task accuracy" in table
    assert (tmp_path / "tokens_per_second.png").stat().st_size > 0 and (tmp_path / "peak_rss.png").exists()


def test_bench_settings_parse():
    from xmtf_onnx.benchmarks.suite import parse_setting

    assert parse_setting("8x4") == (8, 4, False) and parse_setting("8xsample") == (8, 1, True)
    for bad in ("8xsampled", "0x1", "8x0", "x4", "8"):
        with pytest.raises(ValueError):
            parse_setting(bad)


def test_bench_reexports_when_the_options_change(bloom_checkpoint, tmp_path, monkeypatch):
    """The work dir's export is reused only for the same variants by the same exporter: another --quantize (or an
    exporter whose code changed) exports again, so the report holds what was asked for."""
    from xmtf_onnx.benchmarks import suite

    def run(quantize: str) -> list[str]:
        assert suite.main(["--models", str(bloom_checkpoint), "--settings", "1x1", "--backends", "xmtf",
                           "--new-tokens", "2", "--repeats", "1", "--threads", "1", "--quantize", quantize,
                           "--fidelity-prompts", "0", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path),
                           "--no-progress"]) == 0
        report = json.loads((tmp_path / "results.json").read_text())
        return [b["name"] for model in report["models"].values() for b in model["backends"]]

    original = suite.export_fingerprint
    manifest = tmp_path / "work" / bloom_checkpoint.name / "xmtf" / "xmtf_manifest.json"
    assert run("int8") == ["xmtf fp32", "xmtf int8-dynamic"]
    written = manifest.stat().st_mtime_ns
    assert run("int8") == ["xmtf fp32", "xmtf int8-dynamic"] and manifest.stat().st_mtime_ns == written  # reused
    assert run("int4-weight") == ["xmtf fp32", "xmtf int4-weight"]
    monkeypatch.setattr(suite, "export_fingerprint", lambda *a: dict(original(*a), exporter_source="other"))
    written = manifest.stat().st_mtime_ns
    assert run("int4-weight") == ["xmtf fp32", "xmtf int4-weight"] and manifest.stat().st_mtime_ns != written


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


def test_bench_large_run_on_a_tiny_export(bloom_export, tmp_path):
    """The large-model runner's plumbing (numbers are the benchmark's business, not the test's)."""
    from xmtf_onnx.benchmarks.large import main as large_main

    assert large_main(["run", "--exports", str(bloom_export), "--settings", "1x1,2x2", "--new-tokens", "3",
                       "--out", str(tmp_path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "large.json").read_text())
    run = report["runs"][bloom_export.name]
    assert run["variant"] == "fp32" and run["settings"]["2x2"]["tokens"] == 2 * 3
    assert run["rss_after_load"]["RssAnon"] > 0 and run["weight_bytes"] > 0
    assert report["read_bandwidth_bytes_per_second"] > 0


def test_bench_profile_splits_the_step_and_restores_onnxruntime(family, tmp_path):
    """The profile's plumbing on a tiny export: every session of a beam step is attributed, the parts add up to the
    step, the profiler's runs are the measured generation's, and onnxruntime's class is left as it was."""
    import onnxruntime as ort

    from xmtf_onnx.benchmarks.profile import main as profile_main
    from xmtf_onnx.runtime.session import POLICIES

    saved = ort.InferenceSession.__init__, ort.InferenceSession.run, ort.InferenceSession.run_with_iobinding
    new_tokens = 5
    assert profile_main([str(family["export"]), "--setting", "2x2", "--new-tokens", str(new_tokens), "--rounds", "1",
                         "--out", str(tmp_path)]) == 0
    assert (ort.InferenceSession.__init__, ort.InferenceSession.run, ort.InferenceSession.run_with_iobinding) == saved
    report = json.loads((tmp_path / "profile.json").read_text())
    steps = report["steps"]
    assert steps["steps"] == new_tokens - 1  # the first token comes from the prefill
    assert steps["calls_per_step"]["decoder"] == 1 and steps["calls_per_step"]["head"] == 1
    own = {label for label in steps["calls_per_step"] if label.endswith("(runtime's own)")}
    assert own == {"logsoftmax (runtime's own)", "topk (runtime's own)"}  # beam search's two one-node sessions
    assert steps["host_ms"] >= 0
    assert abs(sum(steps["sessions_ms"].values()) + steps["host_ms"] - steps["step_ms"]) < 1e-6
    decoder = report["ops"]["decoder"]
    # one run per token, the first (the prompt, the first token) and the warm-up's left out
    assert decoder["runs"] == new_tokens - 1 and decoder["unit"] == "step"
    assert decoder["op_types"] and 0 < decoder["kernel_us"] <= decoder["run_us"]
    assert sum(o["nodes"] for o in decoder["op_types"]) <= decoder["nodes"]
    if family["name"] == "mt5":  # once per request
        assert report["ops"]["encoder"]["runs"] == 1 and report["ops"]["encoder"]["unit"] == "request"
    assert set(report["policies"]["policies"]) == set(report["sessions"]) == {p.name for p in POLICIES}
    assert all(p["decode_tokens_per_second_median"] > 0 for p in report["policies"]["policies"].values())
    text = (tmp_path / "profile.md").read_text()
    assert "## 1. A decode step, by session" in text and "## 4. One session or two per step" in text


def test_bench_profile_refuses_bad_options_and_missing_folders(tmp_path, capsys):
    from xmtf_onnx.benchmarks.profile import main as profile_main

    with pytest.raises(SystemExit) as raised:
        profile_main([str(tmp_path), "--setting", "2y2"])
    assert raised.value.code == 2 and "BATCHxBEAMS" in capsys.readouterr().err
    out = tmp_path / "out"
    assert profile_main([str(tmp_path / "absent"), "--out", str(out)]) == 1
    assert "error:" in capsys.readouterr().err and not out.exists()


def test_bench_models_tell_presets_checkpoints_and_exports_apart(mt5_checkpoint, tmp_path, monkeypatch, capsys):
    from xmtf_onnx.benchmarks.suite import parse_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mt0-small").mkdir()  # an export named like the preset, where a user exported it
    (tmp_path / "mt0-small" / "xmtf_manifest.json").write_text("{}")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "xmtf_manifest.json").write_text("{}")
    models = parse_args(["--models", f"mt0-small,preset:bloomz-560m,{mt5_checkpoint}"]).models
    assert models == ["preset:mt0-small", "preset:bloomz-560m", str(mt5_checkpoint)]
    assert "is an xmtf export, not a checkpoint" in capsys.readouterr().err
    for entry, message in (("mine", "bench profile mine"), ("preset:nosuch", "neither a checkpoint folder nor a preset")):
        with pytest.raises(SystemExit) as raised:
            parse_args(["--models", entry])
        assert raised.value.code == 2 and message in capsys.readouterr().err
