"""Models and tokenizers: loading a checkpoint folder or hub id (whole, or as a meta-device skeleton for sharded
loading), and the embedded default's tiny Llama and character tokenizer, built from scratch."""

from __future__ import annotations

import re
import string
from pathlib import Path

import torch

from stepkto import prompting

# The scratch model's multi-character tokens (train.py --scratch_tokenizer phrase): the fixed strings of the minimal
# prompt and of the built-in task's solutions (stepkto/arith_task.py), one token each, so that no position is spent
# on text the model cannot get wrong. Digits stay one per token (arithmetic digit by digit), and no phrase crosses a
# step separator (its own token): every token lies in one step.
SCRATCH_PHRASES = ("The answer is \\boxed{", "\nSolution:\n", "Problem: ", "Compute ", prompting.STEP_SEPARATOR,
                   " + ", " - ", " * ", " = ", "}.")


def make_char_tokenizer(phrases: tuple[str, ...] = ()):
    """A character-level tokenizer (printable ASCII) where each of ``phrases`` is one token too (the longest match
    first); saved with ``save_pretrained`` and loaded back with ``AutoTokenizer`` like any hub tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    longest_first = sorted(dict.fromkeys(phrases), key=len, reverse=True)
    vocab = {tok: i for i, tok in enumerate(specials + chars + longest_first)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "|".join([re.escape(phrase) for phrase in longest_first] + [r"[\s\S]"])
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")


def make_tiny_llama(tokenizer, hidden_size=256, num_layers=4, intermediate_size=768, max_len=512, seed=0,
                    meta: bool = False):
    """A randomly initialised LlamaForCausalLM (head_dim 64, so that vLLM's CPU backend runs it too); with
    ``meta`` its skeleton on the meta device (no memory, no init), for sharded loading."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=hidden_size // 64, num_key_value_heads=hidden_size // 64,
        head_dim=64, max_position_embeddings=max_len, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if meta:
        with torch.device("meta"):
            return LlamaForCausalLM(config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_tokenizer(path: str, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:  # Llama-3 style tokenizers ship without one
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def tokenizer_for(model: str, scratch_tokenizer: str = "phrase"):
    """The tokenizer of ``model`` (a folder or hub id), or for "scratch" the character tokenizer built here, with
    SCRATCH_PHRASES one token each too unless scratch_tokenizer is "char"."""
    if model != "scratch":
        return load_tokenizer(model)
    return make_char_tokenizer(SCRATCH_PHRASES if scratch_tokenizer == "phrase" else ())


def load_model(path: str, dtype: str = "float32", meta: bool = False):
    """The causal LM of a folder or hub id in ``dtype``; with ``meta`` its skeleton on the meta device, built
    from its config alone (what every rank but 0 builds for sharded loading: distributed.build_policy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not meta:
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=getattr(torch, dtype))


def is_complete_model_dir(path: str | Path) -> bool:
    """A checkpoint folder is complete once its config, weights and tokenizer are all there."""
    path = Path(path)
    has_weights = any(path.glob("*.safetensors"))
    return has_weights and (path / "config.json").exists() and (path / "tokenizer_config.json").exists()
