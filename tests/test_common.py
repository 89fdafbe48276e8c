"""The JSONL contract (errors that name file, line and field; crash-safe resumable outputs), step
splitting, prompts and the char-level seed model."""

import json

import pytest

from stepkto import cli, jsonl, models, prompting, setup_models, sharding




def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


SCHEMA = {"id": str, "outcome": bool, "labels": list}


def test_read_jsonl_names_file_line_and_field(tmp_path):
    good = '{"id": "a", "outcome": true, "labels": []}\n'
    cases = {
        "bad json": (good + '{"id": "b", "outcome": tru\n', ":2: invalid JSON"),
        "missing": (good + '{"id": "b", "labels": []}\n', ":2: missing field 'outcome'"),
        "wrong type": (good + good + '{"id": "c", "outcome": "yes", "labels": []}\n', ":3: field 'outcome' must be bool"),
        "not an object": ("[1, 2]\n", ":1: expected a JSON object"),
        "int is not bool": ('{"id": 1, "outcome": true, "labels": []}\n', ":1: field 'id' must be str"),
    }
    for name, (text, message) in cases.items():
        path = write(tmp_path / f"{name}.jsonl", text)
        with pytest.raises(jsonl.DataError, match=message) as err:
            jsonl.read_jsonl(path, SCHEMA)
        assert str(path) in str(err.value), name


def test_read_jsonl_empty_and_missing_file(tmp_path):
    with pytest.raises(jsonl.DataError, match="empty"):
        jsonl.read_jsonl(write(tmp_path / "e.jsonl", "\n\n"), SCHEMA)
    with pytest.raises(jsonl.DataError, match="not found"):
        jsonl.read_jsonl(tmp_path / "nope.jsonl", SCHEMA)


def test_bool_is_not_accepted_as_int(tmp_path):
    path = write(tmp_path / "x.jsonl", '{"n": true}\n')
    with pytest.raises(jsonl.DataError, match="field 'n' must be int"):
        jsonl.read_jsonl(path, {"n": int})


def rows_of(ids):
    return [{"id": i, "v": i * 2} for i in ids]


ROW = {"id": str, "v": str}


def test_resume_drops_cut_chunk_and_truncated_line(tmp_path):
    out = tmp_path / "out.jsonl"
    chunks = [["a", "b"], ["c", "d"], ["e"]]
    sharding.append_chunk(out, rows_of(["a", "b"]), ROW)
    # a kill -9 in the middle of the second chunk's write: one full row and half a line
    with open(str(out) + ".partial", "a") as f:
        f.write(json.dumps({"id": "c", "v": 4}) + '\n{"id": "d", "v"')
    kept, done = sharding.resume_rows(out, chunks)
    assert done == 1 and [r["id"] for r in kept] == ["a", "b"]
    for chunk in chunks[done:]:
        sharding.append_chunk(out, rows_of(chunk), ROW)
    sharding.finish_output(out)
    assert not (tmp_path / "out.jsonl.partial").exists()
    assert [r["id"] for r in jsonl.read_jsonl(out)] == ["a", "b", "c", "d", "e"]


def test_resume_with_no_partial_and_a_foreign_partial(tmp_path):
    out = tmp_path / "out.jsonl"
    assert sharding.resume_rows(out, [["a"]]) == ([], 0)
    sharding.append_chunk(out, rows_of(["z"]), ROW)  # rows that do not belong to this input are not kept
    assert sharding.resume_rows(out, [["a"]]) == ([], 0)


def test_writers_refuse_rows_that_break_the_schema_and_write_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(jsonl.DataError, match=r"out.jsonl: row 2 to write: field 'id' must be str, got int"):
        sharding.append_chunk(out, [{"id": "a", "v": "x"}, {"id": 1, "v": "y"}], ROW)
    with pytest.raises(jsonl.DataError, match=r"out.jsonl: row 1 to write: missing field 'v'"):
        jsonl.write_jsonl_atomic(out, [{"id": "a"}], ROW)
    with pytest.raises(jsonl.DataError, match=r"result.json: field 'pass@1' must be float, got str"):
        jsonl.write_json_atomic(tmp_path / "result.json", {"pass@1": "high"}, {"pass@1": float})
    assert not list(tmp_path.iterdir())


def test_stage_schemas_chain():
    """What label.py writes is what train.py and evaluate.py read; what generate.py writes, label.py reads."""
    assert jsonl.SAMPLE_ROW.items() <= jsonl.LABELLED_ROW.items()
    assert jsonl.STEP_KTO_ROW.items() <= jsonl.LABELLED_ROW.items()
    assert jsonl.KTO_ROW.items() <= jsonl.STEP_KTO_ROW.items()
    assert jsonl.RESULT.items() <= jsonl.RESULTS_TABLE_ROW.items()
    schemas = [jsonl.PROBLEM_ROW, jsonl.SFT_ROW, jsonl.SAMPLE_ROW, jsonl.KTO_ROW, jsonl.LABELLED_ROW]
    assert all(schema["id"] is str for schema in schemas)


def test_read_json_and_complete_rows(tmp_path):
    path = write(tmp_path / "result.json", '{"pass@1": 0.5,\n "n": }')
    with pytest.raises(jsonl.DataError, match=r"result.json:2: invalid JSON"):
        jsonl.read_json(path)
    write(path, '{"pass@1": 0.5}')
    assert jsonl.read_json(path, {"pass@1": float}) == {"pass@1": 0.5}
    with pytest.raises(jsonl.DataError, match="missing field 'n'"):
        jsonl.read_json(path, {"n": int})
    cut = write(tmp_path / "log.jsonl", '{"step": 1}\n{"step": 2}\n{"st')
    assert jsonl.read_complete_rows(cut) == [{"step": 1}, {"step": 2}]
    assert jsonl.read_complete_rows(tmp_path / "absent.jsonl") == []


# U+2028, U+2029 and U+0085 stay raw in rows written with ensure_ascii=False; str.splitlines splits on them
SEPARATORS = "one\u2028two\u2029three\x85four"


def test_rows_holding_unicode_line_separators_resume_and_merge_to_one_process_bytes(tmp_path):
    rows = {i: {"id": i, "v": f"{i} {SEPARATORS}"} for i in "abcde"}
    chunk_ids = [["a", "b"], ["c", "d"], ["e"]]

    def write(out, shard):
        return sharding.write_chunks(out, chunk_ids, lambda i: [rows[x] for x in chunk_ids[i]], ROW, shard, "test")

    single = tmp_path / "single.jsonl"
    assert write(single, sharding.Shard())
    assert jsonl.read_jsonl(single, ROW) == list(rows.values())
    killed = tmp_path / "killed.jsonl"  # a kill -9 after chunk 0, in the middle of chunk 1's write
    sharding.append_chunk(killed, [rows["a"], rows["b"]], ROW)
    with open(str(killed) + ".partial", "a", encoding="utf-8") as f:
        f.write(json.dumps(rows["c"], ensure_ascii=False) + "\n" + json.dumps(rows["d"], ensure_ascii=False)[:12])
    assert sharding.resume_rows(killed, chunk_ids) == ([rows["a"], rows["b"]], 1)
    assert write(killed, sharding.Shard()) and killed.read_bytes() == single.read_bytes()
    merged = tmp_path / "merged.jsonl"
    assert not write(merged, sharding.Shard(0, 2)) and write(merged, sharding.Shard(1, 2))
    assert merged.read_bytes() == single.read_bytes()
    assert sharding.shard_rows(merged, chunk_ids, sharding.Shard(0, 2)) == {0: [rows["a"], rows["b"]], 2: [rows["e"]]}


def test_bytes_that_are_not_utf8_name_file_line_and_column(tmp_path):
    good = b'{"id": "a", "v": "x"}\n'
    path = tmp_path / "samples.jsonl"
    path.write_bytes(good + good + b'{"id": "c", "v": "\xff"}\n' + good)
    message = r"samples.jsonl:3: not UTF-8 \(byte 0xff at column 19\)"
    with pytest.raises(jsonl.DataError, match=message):
        jsonl.read_jsonl(path)
    with pytest.raises(jsonl.DataError, match=message):
        jsonl.read_complete_rows(path)
    cut = tmp_path / "cut.jsonl"  # a kill -9 inside a character of the last line: that line is lost
    cut.write_bytes(good + '{"id": "b", "v": "é'.encode()[:-1])
    assert jsonl.read_complete_rows(cut) == [{"id": "a", "v": "x"}]
    result = tmp_path / "result.json"
    result.write_bytes(b'{"a": 1,\n "b": "\xc3("}\n')
    with pytest.raises(jsonl.DataError, match=r"result.json:2: not UTF-8 \(byte 0xc3 at column 8\)"):
        jsonl.read_json(result)


def test_derived_seed_keeps_the_seeds_outputs_were_made_with():
    """generate.py's (seed, chunk index) and label.py mc's (seed, row ids) seeds: changing them changes every
    sample and mc label of a run, so the values are pinned."""
    assert sharding.derived_seed(3, 0) == hash((3, 0)) % 2**31 == 2026115375
    assert sharding.derived_seed(0) == hash((0,)) % 2**31
    assert sharding.derived_seed(1, ["p0#0", "p1#0"]) == 983511498  # zlib.crc32 of '[1, ["p0#0", "p1#0"]]'
    assert 0 <= sharding.derived_seed(-5, 2**40) < 2**31


def test_option_declares_a_field_with_its_help():
    from dataclasses import MISSING, dataclass, fields

    @dataclass
    class Args:
        path: str = cli.option(help="where")
        n: int = cli.option(3, help="how many")

    path, n = fields(Args)
    assert (path.default, path.metadata["help"]) == (MISSING, "where") and (n.default, n.metadata["help"]) == (3, "how many")


def test_every_stage_option_has_help():
    from stepkto import arith_task
    import evaluate
    import generate
    import label
    from stepkto import report
    from dataclasses import fields

    for args_class in (generate.Args, label.Args, evaluate.Args, report.Args, arith_task.Args):
        missing = [f.name for f in fields(args_class) if not f.metadata.get("help")]
        assert not missing, f"{args_class.__module__}.Args: no help for {missing}"


def test_step_spans_and_split():
    text = "\n2 + 3 = 5\n\n5 * 4 = 20  \n \n\n\nThe answer is \\boxed{20}.\n"
    steps = prompting.step_texts(text, prompting.step_spans(text))
    assert steps == ["2 + 3 = 5", "5 * 4 = 20", "The answer is \\boxed{20}."]
    for (a, b), step in zip(prompting.step_spans(text), steps):
        assert text[a:b] == step
    assert prompting.step_texts("one step only", prompting.step_spans("one step only")) == ["one step only"]
    assert prompting.step_texts("  \n\n ", prompting.step_spans("  \n\n ")) == []


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

    from stepkto import arith_task
    from transformers import AutoTokenizer

    models.make_char_tokenizer(models.SCRATCH_PHRASES).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    rng, rates = random.Random(0), arith_task.FlawRates()
    rows, seen = arith_task.make_split("train", 30, seed=0, min_ops=2, max_ops=8), set()
    for row in rows:
        completion, _ = arith_task.write_solution(rng, row["problem"], rates)
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


def test_chat_prompt_with_and_without_a_template():
    tok = models.make_char_tokenizer()
    assert prompting.chat_prompt(tok, "Is it right?", "\n\nVerdict:") == "Is it right?\n\nVerdict:"
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    assert prompting.chat_prompt(tok, "Is it right?", "\n\nVerdict:") == "<|user|>Is it right?<|assistant|>"
    assert prompting.chat_prompt(tok, "q", "", system="s") == "<|system|>s<|user|>q<|assistant|>"


def test_prompt_minimal_and_chat_template():
    tok = models.make_char_tokenizer()
    assert prompting.build_prompt(tok, "Compute 1 + 2.", "minimal") == "Problem: Compute 1 + 2.\nSolution:\n"
    plain = prompting.build_prompt(tok, "Compute 1 + 2.", "instruct")
    assert "\\boxed{}" in plain and "Compute 1 + 2." in plain and "blank line" in plain
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}<|assistant|>"
    chat = prompting.build_prompt(tok, "Compute 1 + 2.", "instruct")
    assert chat.startswith("<|user|>Solve") and chat.endswith("<|assistant|>")


def test_convert_gguf_refuses_a_file_whose_sha256_differs(tmp_path):
    """setup.sh --models converts only the exact GGUF file whose sha256 stepkto/setup_models.py records."""
    import pytest

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(jsonl.DataError, match="sha256"):
        setup_models.convert_gguf(fake, tmp_path / "out", setup_models.SMOLLM2_GGUF_SHA256)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_converted_real_model_is_an_ordinary_save_pretrained_folder():
    """What setup.sh --models wrote (tests/run.sh runs it): config, weights, tokenizer with a chat template,
    and a note that the weights are dequantized from 4 bits."""
    import json
    import os

    import pytest

    from pathlib import Path

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


def test_token_offsets_fall_back_to_the_exact_rule_for_a_sentencepiece_style_tokenizer():
    """A Metaspace ("▁") tokenizer drops the leading space of a decoded piece, so pieces do not add up to
    the whole text: generate.token_offsets must then give the exact rule's offsets."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    import generate

    words = ["▁Step", "▁1:", "▁3", "▁+", "▁4", "▁=", "▁7."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>"] + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    text = "Step 1: 3 + 4 = 7."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and 0 not in ids
    assert generate.token_offsets(tokenizer, ids, text) == generate.exact_token_offsets(tokenizer, ids, text)
    assert generate.exact_token_offsets(tokenizer, ids, text) == [0, 4, 7, 9, 11, 13, 15]
