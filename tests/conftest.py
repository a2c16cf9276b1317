"""Tiny random mT5 and BLOOM checkpoints, with tokenizers trained here, exported once per session.

The configs are chosen to catch real bugs: mT5 with d_kv (16) != d_model / num_heads (40 / 3), a BLOOM
with an odd number of heads (5), logits wider than the tokenizers' vocabularies, as in the real models.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED_PROMPTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts.jsonl"
FALLBACK_TEXT = [
    "Translate to English: Je t'aime.", "Question: How many eggs are left? Answer:",
    "Der schnelle braune Fuchs springt über den faulen Hund.", "El perro come pan y bebe agua.",
    "Кошка спит на диване.", "猫はソファで寝ています。", "Paka analala kwenye sofa.",
] * 20


def training_text() -> list[str]:
    """Real multilingual prompts from ../shared/data when present, a small built-in list otherwise."""
    if SHARED_PROMPTS.is_file():
        with open(SHARED_PROMPTS, encoding="utf-8") as handle:
            return [json.loads(line)["prompt"] for line in handle]
    return FALLBACK_TEXT


def sample_prompts(count: int = 6) -> list[str]:
    texts = training_text()
    step = max(1, len(texts) // count)
    return [t[:160] for t in texts[::step][:count]]


def build_mt5(folder: Path, num_decoder_layers: int = 2, with_tokenizer: bool = True) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import MT5Config, MT5ForConditionalGeneration, T5Tokenizer

    torch.manual_seed(0)
    config = MT5Config(vocab_size=1100, d_model=40, d_kv=16, d_ff=48, num_layers=2,
                       num_decoder_layers=num_decoder_layers, num_heads=3, relative_attention_num_buckets=8,
                       relative_attention_max_distance=20, decoder_start_token_id=0, eos_token_id=1,
                       pad_token_id=0, tie_word_embeddings=False)
    MT5ForConditionalGeneration(config).eval().save_pretrained(folder)
    if with_tokenizer:
        # mT0 ships spiece.model only: export must convert it to tokenizer.json.
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(training_text()), model_prefix=str(folder / "spiece"), vocab_size=1000,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=0.98, model_type="unigram",
            hard_vocab_limit=False, minloglevel=3,
        )
        T5Tokenizer(vocab_file=str(folder / "spiece.model"), extra_ids=0, legacy=False).save_pretrained(folder)
        os.remove(folder / "spiece.vocab")
    return folder


def build_bloom(folder: Path, with_tokenizer: bool = True, vocab_size: int = 640) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import BloomConfig, BloomForCausalLM, BloomTokenizerFast

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=vocab_size, hidden_size=40, n_layer=2, n_head=5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3)
    BloomForCausalLM(config).eval().save_pretrained(folder)
    if with_tokenizer:
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(training_text(), trainer)
        BloomTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                           pad_token="<pad>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def thread_policy_cache(tmp_path_factory) -> Path:
    """The machine's thread policy (runtime/tuning.py) is measured once per test session into a temporary cache,
    never into the user's ~/.cache; subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("xmtf-cache")
    previous = os.environ.get("XMTF_ONNX_CACHE")
    os.environ["XMTF_ONNX_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("XMTF_ONNX_CACHE", None)
    else:
        os.environ["XMTF_ONNX_CACHE"] = previous


@pytest.fixture(scope="session")
def mt5_checkpoint(tmp_path_factory) -> Path:
    return build_mt5(tmp_path_factory.mktemp("checkpoints") / "tiny-mt5")


@pytest.fixture(scope="session")
def bloom_checkpoint(tmp_path_factory) -> Path:
    return build_bloom(tmp_path_factory.mktemp("checkpoints") / "tiny-bloom")


@pytest.fixture(scope="session")
def mt5_export(mt5_checkpoint, tmp_path_factory) -> Path:
    from xmtf_onnx.export import export

    return Path(export(str(mt5_checkpoint), tmp_path_factory.mktemp("exports") / "mt5", progress=False))


@pytest.fixture(scope="session")
def bloom_export(bloom_checkpoint, tmp_path_factory) -> Path:
    from xmtf_onnx.export import export

    return Path(export(str(bloom_checkpoint), tmp_path_factory.mktemp("exports") / "bloom", progress=False))


# The families every test module parametrizes over; test_families_are_tested checks it is complete.
TESTED_FAMILIES = {"mt5": ("mt5_checkpoint", "mt5_export"), "bloom": ("bloom_checkpoint", "bloom_export")}


@pytest.fixture(params=sorted(TESTED_FAMILIES))
def family(request) -> dict:
    checkpoint_fixture, export_fixture = TESTED_FAMILIES[request.param]
    return {"name": request.param, "checkpoint": request.getfixturevalue(checkpoint_fixture),
            "export": request.getfixturevalue(export_fixture)}
