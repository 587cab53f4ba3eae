"""Decoder-only LLM presets (Llama-style, from a transformers config) with a seeded random init.

The vocabulary size comes from the run's tokenizer; `reference_vocab` is the vocabulary the
preset's nominal size assumes (8192 for our own small presets, 32000 for Photon's sizes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    tie_embeddings: bool
    reference_vocab: int
    nominal_params: float


PRESETS: dict[str, Preset] = {
    "nano": Preset(56, 2, 4, 160, False, 8192, 1e6),
    "tiny": Preset(320, 6, 5, 1280, False, 8192, 15e6),
    "small": Preset(512, 16, 8, 1536, False, 8192, 60e6),
    "125m": Preset(768, 12, 12, 2560, True, 32000, 125e6),
    "350m": Preset(1024, 24, 16, 2816, True, 32000, 350e6),
    "1b": Preset(2048, 18, 16, 5632, True, 32000, 1e9),
    "3b": Preset(3200, 24, 32, 8640, True, 32000, 3e9),
    "7b": Preset(4096, 32, 32, 11008, False, 32000, 7e9),
}


def model_config(preset: str, vocab_size: int, seq_len: int):
    """The transformers LlamaConfig of a preset (transformers is imported here: config.py reads
    PRESETS without paying for it)."""
    from transformers import LlamaConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        intermediate_size=p.intermediate,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.heads,
        max_position_embeddings=max(seq_len, 128),
        tie_word_embeddings=p.tie_embeddings,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        use_cache=False,
    )


def build_model(preset: str, vocab_size: int, seq_len: int, seed: int, device: str | torch.device = "cpu"):
    """Same (preset, vocab, seq_len, seed) -> bit-identical initial weights on every CPU peer."""
    from transformers import LlamaForCausalLM

    cfg = model_config(preset, vocab_size, seq_len)
    cfg._attn_implementation = "sdpa"
    if str(device) == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(device)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a (B, T+1) window batch."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=inputs).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
