"""Real architectures with random weights: the published config numbers of mT0 and BLOOMZ, so that
benchmarks and demos run with no Hub access. Speed depends on shapes, not on weight values."""

from __future__ import annotations

import itertools
import math

from .errors import ModelLoadError

_MT5 = dict(model_type="mt5", vocab_size=250112, d_kv=64, relative_attention_num_buckets=32,
            relative_attention_max_distance=128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
            layer_norm_epsilon=1e-6, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
_BLOOM = dict(model_type="bloom", vocab_size=250880, layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2,
              pad_token_id=3, apply_residual_connection_post_layernorm=False, tie_word_embeddings=True)

PRESETS: dict[str, dict] = {
    "mt0-small": dict(_MT5, d_model=512, d_ff=1024, num_heads=6, num_layers=8, num_decoder_layers=8),
    "mt0-base": dict(_MT5, d_model=768, d_ff=2048, num_heads=12, num_layers=12, num_decoder_layers=12),
    "mt0-large": dict(_MT5, d_model=1024, d_ff=2816, num_heads=16, num_layers=24, num_decoder_layers=24),
    "mt0-xl": dict(_MT5, d_model=2048, d_ff=5120, num_heads=32, num_layers=24, num_decoder_layers=24),
    "mt0-xxl": dict(_MT5, d_model=4096, d_ff=10240, num_heads=64, num_layers=24, num_decoder_layers=24),
    "bloomz-560m": dict(_BLOOM, hidden_size=1024, n_layer=24, n_head=16),
    "bloomz-1b1": dict(_BLOOM, hidden_size=1536, n_layer=24, n_head=16),
    "bloomz-1b7": dict(_BLOOM, hidden_size=2048, n_layer=24, n_head=16),
    "bloomz-3b": dict(_BLOOM, hidden_size=2560, n_layer=30, n_head=32),
    "bloomz-7b1": dict(_BLOOM, hidden_size=4096, n_layer=30, n_head=32),
}


def preset_config(name: str):
    """A transformers config for preset NAME (mt0-small, bloomz-560m, ...)."""
    from transformers import AutoConfig

    if name not in PRESETS:
        raise ModelLoadError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    values = dict(PRESETS[name])
    return AutoConfig.for_model(values.pop("model_type"), **values)


def preset_source(name: str, seed: int = 0):
    """(config, weight source) for preset NAME: seeded random weights with transformers' initial distributions,
    generated tensor by tensor (and block of rows by block of rows) as the exporter reads them: no model is
    ever built, so mt0-xxl and bloomz-7b1 work on a machine smaller than their fp32 weights."""
    from .families import family_for_model_type
    from .weights import RandomSource

    config = preset_config(name)
    return config, RandomSource(family_for_model_type(config.model_type).parameters(config), seed)


# The special tokens of each family at the real tokenizers' ids (mT5's spiece.model, BLOOM's tokenizer.json).
SPECIAL_TOKENS = {"mt5": {0: "<pad>", 1: "</s>", 2: "<unk>"}, "bloom": {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<pad>"}}
_SCRIPTS = [(0x30, 0x3A), (0x41, 0x5B), (0x61, 0x7B), (0xE0, 0x100), (0x3B1, 0x3CA), (0x410, 0x450), (0x5D0, 0x5EB),
            (0x627, 0x64B), (0x905, 0x93A), (0x980, 0x9FF), (0xE01, 0xE3B), (0x3041, 0x3097), (0x30A1, 0x30FB),
            (0x4E00, 0xA000), (0xAC00, 0xD7A4)]  # digits, Latin, Greek, Cyrillic, Hebrew, Arabic, Indic, Thai, CJK, Hangul
_WORD = "\u2581"  # SentencePiece's word-start mark


def _synthetic_pieces():
    """Characters of the major scripts, then Latin and Cyrillic letter strings, each with and without a word start."""
    yield _WORD
    characters = [chr(c) for low, high in _SCRIPTS for c in range(low, high)] + list(".,;:!?'\"()[]{}-/&%$#@*+=<>|")
    for length in (1, 2, 3, 4):
        pool = characters if length == 1 else [chr(c) for c in range(0x61, 0x7B)] + (
            [chr(c) for c in range(0x430, 0x450)] if length < 4 else [])
        for letters in itertools.product(pool, repeat=length):
            if length > 1 and (ord(letters[0]) < 0x400) != (ord(letters[-1]) < 0x400):
                continue  # no mixed-script strings
            piece = "".join(letters)
            yield _WORD + piece
            yield piece


def preset_tokenizer(config):
    """A tokenizer over the preset's whole vocabulary (config.vocab_size pieces), so that text goes in and (random)
    text comes out offline: a Unigram model with byte fallback (any text encodes) over the characters of the major
    scripts and short letter strings; the family's special tokens at their real ids; mT5 appends </s> as its
    tokenizer does. It is not the real tokenizer (the manifest says so): ids mean nothing to real weights."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = SPECIAL_TOKENS[config.model_type]
    pieces = itertools.chain((f"<0x{b:02X}>" for b in range(256)), _synthetic_pieces())
    vocabulary = []
    for index in range(config.vocab_size):
        # Scores fall slowly with the rank, so the longest piece that covers a span wins, as in a trained model.
        vocabulary.append((specials[index], 0.0) if index in specials else (next(pieces), -2.0 - math.log1p(index)))
    unk = next(i for i, token in specials.items() if token == "<unk>")
    tokenizer = Tokenizer(models.Unigram(vocabulary, unk_id=unk, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Replace(_WORD, " "),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in specials.values()])
    if config.model_type == "mt5":
        eos = config.eos_token_id
        tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {specials[eos]}",
                                                                 pair=f"$A {specials[eos]} $B {specials[eos]}",
                                                                 special_tokens=[(specials[eos], eos)])
    return tokenizer
