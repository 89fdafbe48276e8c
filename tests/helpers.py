"""Small real models that several test files build: a tiny LlamaForCausalLM and a reference near it."""

import copy
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import models


def tiny_llama(vocab_size: int, seed: int, initializer_range: float = 0.2, pad_token_id: int | None = None):
    """A real LlamaForCausalLM, small enough for CPU tests; a wide init makes log-probs non-uniform."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
        initializer_range=initializer_range, pad_token_id=pad_token_id,
    )
    return LlamaForCausalLM(config)


def perturbed_copy(model, seed: int, scale: float = 0.05):
    """A reference model near the policy, so that the log-ratios are small but not zero."""
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return reference


def save_char_llama(path: Path, seed: int) -> str:
    """An untrained char-level Llama saved with its tokenizer: real transformers classes, garbage outputs."""
    tok = models.make_char_tokenizer()
    models.make_tiny_llama(tok, hidden_size=64, num_layers=1, intermediate_size=128, seed=seed).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
