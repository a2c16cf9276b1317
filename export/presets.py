"""Real architectures with random weights: the published config numbers of mT0 and BLOOMZ, so that
benchmarks and demos run with no Hub access. Speed depends on shapes, not on weight values."""

from __future__ import annotations

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
