"""stepkto/models.py and stepkto/setup_models.py: the seed model's tokenizers and tiny Llama, and SmolLM2
converted from its pinned GGUF file."""

import json

import pytest

from stepkto import jsonl, models, prompting, setup_models


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_char_tokenizer_and_tiny_llama_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = models.make_char_tokenizer()
    model = models.make_tiny_llama(tok, hidden_size=64, num_layers=1, intermediate_size=128)
    tok.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)
    assert models.is_complete_model_dir(tmp_path)
    tok2, model2 = AutoTokenizer.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)
    text = "Problem: Compute (12 + 7) * 3.\nSolution:\n12 + 7 = 19\n\nThe answer is \\boxed{57}."
    enc = tok2(text, return_offsets_mapping=True)
    assert tok2.decode(enc.input_ids) == text
    assert all(b - a == 1 for a, b in enc.offset_mapping)  # one token per character
    assert model2.config.head_dim == 64
    assert sum(p.numel() for p in model2.parameters()) == sum(p.numel() for p in model.parameters())


def test_phrase_tokenizer_keeps_digits_and_steps_whole(tmp_path):
    """The embedded default's tokenizer: each fixed string of the built-in task is one token, every digit its own
    token, no token crosses a step boundary, and the text decodes back exactly, also after save and load."""
    import random

    from transformers import AutoTokenizer

    from stepkto import arith_task

    models.make_char_tokenizer(models.SCRATCH_PHRASES).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    rng, rates = random.Random(0), arith_task.FlawRates()
    rows, seen = arith_task.make_split("train", 30, seed=0, min_ops=2, max_ops=8), set()
    for row in rows:
        completion, *_ = arith_task.write_solution(rng, row["problem"], rates)
        text = prompting.build_prompt(tok, row["problem"], "minimal") + completion
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert tok.decode(enc.input_ids) == text
        pieces = [text[a:b] for a, b in enc.offset_mapping]
        assert "".join(pieces) == text and tok.unk_token_id not in enc.input_ids
        seen.update(pieces)
        assert all(len(p) == 1 or p in models.SCRATCH_PHRASES for p in pieces)
        assert all(not any(ch.isdigit() for ch in p) for p in pieces if len(p) > 1)  # digits stay single
        inside = [i for a, b in prompting.step_spans(completion) for i in range(a, b)]
        cut = len(text) - len(completion)
        for a, b in enc.offset_mapping:  # a token is inside one step or outside every step
            covered = {i + cut for i in inside} & set(range(a, b))
            assert not covered or len(covered) == b - a
    assert seen >= set(models.SCRATCH_PHRASES)  # the list matches what the built-in task writes
    ids = tok("Problem: Compute 12 + 7.\nSolution:\n12 + 7 = 19\n\nThe answer is \\boxed{19}.")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["Problem: ", "Compute ", "1", "2", " + ", "7", ".", "\nSolution:\n",
        "1", "2", " + ", "7", " = ", "1", "9", "\n\n", "The answer is \\boxed{", "1", "9", "}."]


def test_convert_gguf_refuses_a_file_whose_sha256_differs(tmp_path):
    """setup.sh --models converts only the exact GGUF file whose sha256 stepkto/setup_models.py records."""

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(jsonl.DataError, match="sha256"):
        setup_models.convert_gguf(fake, tmp_path / "out", setup_models.SMOLLM2_GGUF_SHA256)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_converted_real_model_is_an_ordinary_save_pretrained_folder():
    """What setup.sh --models wrote (tests/run.sh runs it): config, weights, tokenizer with a chat template,
    and a note that the weights are dequantized from 4 bits."""
    import os
    from pathlib import Path

    import pytest

    folder = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct"
    if not folder.exists() and not os.environ.get("STEPKTO_REQUIRE_REAL_MODEL"):
        pytest.skip("bash setup.sh --models has not run")
    assert models.is_complete_model_dir(folder)
    source = json.loads((folder / "source.json").read_text())
    assert source["sha256"] == setup_models.SMOLLM2_GGUF_SHA256 and "dequantized" in source["note"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152 and "quantization_config" not in config
    tokenizer = models.load_tokenizer(str(folder))
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
