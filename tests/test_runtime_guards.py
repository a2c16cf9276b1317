"""The runtime stays lean, rejects bad input with typed errors, and refuses broken folders."""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import textwrap
import weakref

import pytest

from xmtf_onnx.runtime import (GenerationInputError, ManifestError, ProviderUnavailableError, XmtfError, load)

BLOCKED = ("torch", "transformers", "optimum", "xmtf_onnx.export", "onnx", "sentencepiece",
           "starlette", "uvicorn", "prometheus_client", "httpx", "ray")  # the serve extra stays in runtime/serve


def test_runtime_imports_and_generates_without_torch(bloom_export, mt5_export):
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r} or name.startswith("xmtf_onnx.export"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from xmtf_onnx.runtime import load
        for folder in ({str(bloom_export)!r}, {str(mt5_export)!r}):
            out = load(folder).generate("Hello", max_new_tokens=3, num_beams=2)
            assert len(out.sequences) == 1
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
        print("LOADED", loaded)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


BAD_CALLS = [
    (dict(prompts=[]), "empty"),
    (dict(prompts=[""]), "empty"),
    (dict(prompts=["ok", 3]), "not str"),
    (dict(input_ids=[[1, "x"]]), "not an integer"),
    (dict(input_ids=[[1, 2.5]]), "not an integer"),
    (dict(input_ids=[[1, 10**9]]), "outside the vocabulary"),
    (dict(input_ids=[[-1]]), "outside the vocabulary"),
    (dict(input_ids=[[]]), "non-empty"),
    (dict(input_ids=[]), "non-empty"),
    (dict(input_ids=[[5]], max_new_tokens=-1), "max_new_tokens"),
    (dict(input_ids=[[5]], num_beams=0), "num_beams"),
    (dict(input_ids=[[5]], num_beams=2, num_return_sequences=3), "cannot exceed num_beams"),
    (dict(input_ids=[[5]], do_sample=True, top_p=0.0), "top_p"),
    (dict(input_ids=[[5]], do_sample=True, top_p=1.5), "top_p"),
    (dict(input_ids=[[5]], do_sample=True, temperature=0.0), "temperature"),
    (dict(input_ids=[[5]], do_sample=True, temperature=-1.0), "temperature"),
    (dict(input_ids=[[5]], eos_token_id=[10**9]), "eos_token_id"),
    (dict(input_ids=[[5]], frobnicate=1), "unknown generation option"),
    (dict(input_ids=[[5]], early_stopping="sometimes"), "early_stopping"),
    (dict(prompts=["a"], input_ids=[[5]]), "not both"),
]


@pytest.mark.parametrize("call, message", BAD_CALLS, ids=[m + str(i) for i, (_, m) in enumerate(BAD_CALLS)])
def test_bad_input_is_a_typed_error(bloom_export, call, message):
    model = load(bloom_export)
    call = dict(call)
    prompts = call.pop("prompts", None)
    with pytest.raises(GenerationInputError, match=message) as raised:
        model.generate(prompts, **call)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, XmtfError)


def test_unknown_provider(bloom_export):
    with pytest.raises(ProviderUnavailableError, match="unknown provider"):
        load(bloom_export, provider="tpu")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ProviderUnavailableError, match="not available"):
            load(bloom_export, provider="cuda")
    with pytest.raises(ProviderUnavailableError, match="threads"):
        load(bloom_export, threads=0)


@pytest.fixture
def copy_of(tmp_path, bloom_export):
    target = tmp_path / "copy"
    shutil.copytree(bloom_export, target)
    return target


def _edit_manifest(folder, change):
    path = folder / "xmtf_manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_unknown_format_version(copy_of):
    _edit_manifest(copy_of, lambda d: d.update(format_version=99))
    with pytest.raises(ManifestError, match="format_version 99.*Re-export"):
        load(copy_of)


def test_corrupted_and_missing_files(copy_of):
    data_file = copy_of / "decoder.onnx.data"
    raw = bytearray(data_file.read_bytes())
    raw[100] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="sha256"):
        load(copy_of)
    data_file.unlink()
    with pytest.raises(ManifestError, match="missing"):
        load(copy_of)


def test_tokenizer_read_on_first_text_use(copy_of):
    """Token ids in and out never read tokenizer.json (a 250k vocabulary is ~110 MB); text reads it once, and a
    broken one is a typed error then; a missing one is refused at load."""
    model = load(copy_of)
    out = model.generate(input_ids=[[5, 6, 7]], max_new_tokens=3)
    assert model._text._tokenizer is None and out.sequences[0]
    assert out.texts == [model.decode(out.sequences[0])] and model._text._tokenizer is not None
    reference = weakref.ref(model)
    del model
    gc.collect()
    assert reference() is None and out.texts  # an output kept does not keep the model alive
    (copy_of / "tokenizer.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot be read by tokenizers"):
        load(copy_of, verify=False).generate("Hello", max_new_tokens=2)
    (copy_of / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match="tokenizer.json, which is missing"):
        load(copy_of, verify=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise hints are Linux-only")
def test_weight_files_mapped_for_random_reads(mt5_export):
    """After load, the graphs' external data that onnxruntime left memory-mapped (the embedding's rows) is marked
    random-read, so a row read does not pull its neighbours into memory (a fresh process: no other loads)."""
    script = textwrap.dedent(f"""
        import os
        from xmtf_onnx.runtime import load
        model = load({str(mt5_export)!r})
        model.generate(input_ids=[[5, 6, 7]], max_new_tokens=2)
        data = {{os.path.realpath(model.manifest.path(item["path"])) for file in
                model.manifest.variant(model.variant)["files"].values() for item in file.get("data", [])}}
        current = None
        for line in open("/proc/self/smaps", encoding="utf-8"):
            fields = line.split()
            if fields and not fields[0].endswith(":"):  # a mapping's first line: range, permissions, ... [path]
                current = fields[5] if len(fields) >= 6 else None
            elif line.startswith("VmFlags") and current in data:
                print(current, "rr" in fields[1:])
    """)
    lines = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split("\n")
    mapped = [line.split() for line in lines if line]
    assert mapped and all(flag == "True" for _, flag in mapped)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux-only")
def test_weight_pages_are_paged_out_after_load(bloom_export):
    """What onnxruntime leaves mapped of the weight files after making the sessions is paged out (nothing of them
    resident before the first run), where the kernel has MADV_PAGEOUT (probed on a file of its own first); the
    outputs are those of a load without it (a fresh process each)."""
    script = textwrap.dedent(f"""
        import mmap, os, sys, tempfile
        from xmtf_onnx.runtime import load, session

        def resident(paths):  # kB of these files' mappings in memory
            total, current = 0, None
            for line in open("/proc/self/smaps", encoding="utf-8"):
                fields = line.split()
                if fields and not fields[0].endswith(":"):
                    current = fields[5] if len(fields) >= 6 else None
                elif fields[:1] == ["Rss:"] and current in paths:
                    total += int(fields[1])
            return total

        with tempfile.NamedTemporaryFile() as probe:  # does this kernel page out a mapped file page?
            probe.write(b"x" * mmap.PAGESIZE)
            probe.flush()
            view = mmap.mmap(probe.fileno(), mmap.PAGESIZE, prot=mmap.PROT_READ)
            view[0]
            session.page_out_weights([probe.name])
            supported = resident({{os.path.realpath(probe.name)}}) == 0
            view.close()
        if sys.argv[1] == "off":
            import xmtf_onnx.runtime.model as model_module
            model_module.page_out_weights = lambda paths: None
        model = load({str(bloom_export)!r})
        data = {{os.path.realpath(model.manifest.path(item["path"])) for file in
                model.manifest.variant(model.variant)["files"].values() for item in file.get("data", [])}}
        pages = resident(data)
        out = model.generate(input_ids=[[5, 6, 7], [9, 10]], max_new_tokens=5, num_beams=2)
        print(supported, pages, out.sequences)
    """)
    runs = {}
    for mode in ("on", "off"):
        result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        supported, resident, sequences = result.stdout.strip().split(" ", 2)
        runs[mode] = (supported == "True", int(resident), sequences)
    assert runs["on"][2] == runs["off"][2], runs
    if runs["on"][0]:
        assert runs["on"][1] == 0 < runs["off"][1]


def test_manifest_checked_against_sessions(copy_of):
    def change(data):
        data["cache"]["head_dim"] = 9
        for role in ("decoder", "decoder_shared"):  # whichever form the CPU loads
            data["io"][role]["outputs"].append("present_key.99")

    _edit_manifest(copy_of, change)
    with pytest.raises(ManifestError) as raised:
        load(copy_of)
    assert "head_dim=9" in str(raised.value) and "present_key.99" in str(raised.value)


@pytest.mark.parametrize("where", ["absolute", "parent", "symlink"])
def test_paths_leaving_the_folder_are_refused_before_reading(copy_of, where):
    """A folder may come from someone else: a manifest path that leaves it is refused before any file is read."""
    outside = copy_of.parent / "outside"
    outside.mkdir()
    shutil.copy(copy_of / "decoder.onnx.data", outside / "decoder.onnx.data")
    if where == "symlink":
        (copy_of / "decoder.onnx.data").unlink()
        (copy_of / "decoder.onnx.data").symlink_to(outside / "decoder.onnx.data")
        named = "decoder.onnx.data"
    else:
        named = str(outside / "never-read.onnx") if where == "absolute" else "../outside/never-read.onnx"
        _edit_manifest(copy_of, lambda d: d["variants"]["fp32"]["files"]["decoder"].update(path=named))
    with pytest.raises(ManifestError, match=f"names files outside .*{named}.*Do not load it"):
        load(copy_of)


def test_graph_data_leaving_the_folder_is_refused(copy_of):
    """onnxruntime refuses a graph whose external data leaves the folder; the runtime says so as a ManifestError."""
    import onnx

    graph = onnx.load(str(copy_of / "head.onnx"), load_external_data=False)
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside.data"
    onnx.save(graph, str(copy_of / "head.onnx"))
    _edit_manifest(copy_of, lambda d: d["variants"]["fp32"]["files"]["head"].update(
        bytes=(copy_of / "head.onnx").stat().st_size))
    with pytest.raises(ManifestError, match="escapes model directory"):
        load(copy_of, verify=False)


def test_not_an_export(tmp_path):
    with pytest.raises(ManifestError, match="xmtf-onnx export"):
        load(tmp_path)
    with pytest.raises(ManifestError, match="not a folder"):
        load(tmp_path / "missing")
    (tmp_path / "xmtf_manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="JSON"):
        load(tmp_path)


def test_unknown_variant(bloom_export):
    with pytest.raises(ManifestError, match="no variant 'int3'"):
        load(bloom_export, variant="int3")


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "xmtf_onnx.runtime.cli", *args], capture_output=True, text=True,
                          input=stdin)


def test_cli_generate(bloom_export, mt5_export):
    from xmtf_onnx.runtime import load as load_model

    model = load_model(mt5_export)
    expected = model.generate("Hello world", max_new_tokens=5).texts[0]
    result = _cli("generate", str(mt5_export), "Hello world", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected
    result = _cli("generate", str(bloom_export), "--jsonl", "--max-new-tokens", "4", "--num-beams", "2",
                  stdin="first prompt\nsecond prompt\n")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["input"] for line in lines] == ["first prompt", "second prompt"]
    result = _cli("generate", str(bloom_export), "--ids", "5", "6", "7", "--max-new-tokens", "3")
    assert result.returncode == 0 and len(result.stdout.split()) >= 1
    result = _cli("generate", str(bloom_export), "x", "--num-beams", "0")
    assert result.returncode == 1 and "num_beams" in result.stderr


def test_cli_help_teaches():
    result = _cli("--help")
    assert result.returncode == 0 and "preset:mt0-small" in result.stdout
    result = _cli("export", "--help")
    assert "preset:NAME" in result.stdout and "--force" in result.stdout
