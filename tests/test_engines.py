"""One engine per process, and the BOS rule: engines.get_engine holds one engine at a time (another model's
engine starts only after the live one is shut down and freed; the policy and its mc rollouts share one), and
every prompt (both engines, the judge, mc rollouts, train.py) starts with BOS when the tokenizer's own
encoding does. The vLLM engine's side: tests/test_vllm_engine.py."""

import gc
import weakref
from pathlib import Path

import pytest
from tokenizers import processors

from stepkto import arith_task, engines, jsonl, models, prompting
import evaluate
import generate
import label
import train
from helpers import save_char_llama


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory) -> str:
    """A second tiny model (another folder, other weights): the judge."""
    return save_char_llama(tmp_path_factory.mktemp("judge"), seed=1)


@pytest.fixture(scope="module")
def benchmark(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "test.jsonl"
    rows = [{**row, "solution": "3 + 4 = 7\n\nThe answer is \\boxed{7}."} for row in arith_task.make_split("test", 4, 0)]
    jsonl.write_jsonl_atomic(path, rows)
    return path


@pytest.fixture
def engine_log(monkeypatch):
    """Every engine start as (model, engines still alive just before it), liveness by weak reference after gc."""
    starts, alive = [], []
    real_start = engines.start_engine

    def start(key):
        gc.collect()
        starts.append((key.model, sum(ref() is not None for ref in alive)))
        engine = real_start(key)
        alive.append(weakref.ref(engine.model))
        return engine

    monkeypatch.setattr(engines, "start_engine", start)
    yield starts
    engines.close_engine()


def evaluate_args(model, benchmark, out, **extra):
    args = dict(model=model, benchmark=str(benchmark), output_dir=str(out), max_new_tokens=8, prompt_style="minimal",
                engine="transformers", sample_k=2, **extra)
    return evaluate.Args(**args)


def test_evaluate_with_a_judge_holds_one_engine_at_a_time(tiny_model, judge_model, benchmark, tmp_path, engine_log):
    """Greedy and sampled solutions on the policy's engine, then the judge's: two starts, never two alive."""
    evaluate.main(evaluate_args(tiny_model, benchmark, tmp_path, prm="judge", judge_model=judge_model,
                                judge_engine="transformers", judge_max_new_tokens=4))
    assert engine_log == [(tiny_model, 0), (judge_model, 0)]
    assert jsonl.read_json(tmp_path / "result.json")["prm"] == "judge"


def test_evaluate_with_mc_rolls_out_on_the_policy_engine(tiny_model, benchmark, tmp_path, engine_log):
    """mc's rollout policy is the evaluated model: its engine serves the rollouts too (one start)."""
    evaluate.main(evaluate_args(tiny_model, benchmark, tmp_path, prm="mc", mc_rollouts=2, mc_max_new_tokens=4))
    assert engine_log == [(tiny_model, 0)]


def test_an_engine_of_another_setting_replaces_the_live_one(tiny_model, engine_log):
    first = id(engines.get_engine(tiny_model, engines.EngineSettings(engine="transformers")).model)
    assert id(engines.get_engine(tiny_model, engines.EngineSettings(engine="transformers")).model) == first
    engines.get_engine(tiny_model, engines.EngineSettings(engine="transformers", dtype="float64"))
    assert engine_log == [(tiny_model, 0), (tiny_model, 0)]


def test_dtype_auto_is_float32_on_a_cpu(tiny_model):
    assert engines.engine_key(tiny_model, engines.EngineSettings(engine="transformers")).dtype == "float32"


# ----------------------------------------------------------------------------- BOS


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory) -> str:
    """A tiny model whose tokenizer adds <bos> (as Llama's base tokenizers do) and has no chat template."""
    tok = models.make_char_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    assert tok("ab")["input_ids"][0] == tok.bos_token_id and not tok.chat_template
    path = tmp_path_factory.mktemp("bos_model")
    models.make_tiny_llama(tok, hidden_size=64, num_layers=1, intermediate_size=128).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_encode_prompt_adds_bos_once_and_only_where_the_tokenizer_does(bos_model, tiny_model):
    bos_tok, plain = models.load_tokenizer(bos_model), models.load_tokenizer(tiny_model)
    assert prompting.encode_prompt(bos_tok, "Problem: 1")[:2] == [bos_tok.bos_token_id, bos_tok("P", add_special_tokens=False)["input_ids"][0]]
    assert prompting.encode_prompt(bos_tok, "<bos>Problem: 1").count(bos_tok.bos_token_id) == 1  # a template's own BOS
    assert prompting.encode_prompt(plain, "Problem: 1") == plain("Problem: 1", add_special_tokens=False)["input_ids"]


def test_every_prompt_of_a_base_model_starts_with_bos(bos_model, benchmark, tmp_path, monkeypatch):
    """The policy's samples (their prompt_ids), the judge's prompts and mc's rollouts, through the engines."""
    out = tmp_path / "samples.jsonl"
    settings = generate.Settings(model=bos_model, engine="transformers", num_samples=2, max_new_tokens=6,
                                 prompt_style="minimal")
    generate.generate_rows(generate.load_problems(str(benchmark), 0), str(out), settings)
    rows = jsonl.read_jsonl(out)
    bos = models.load_tokenizer(bos_model).bos_token_id
    assert all(r["prompt_ids"][0] == bos and r["prompt_ids"].count(bos) == 1 for r in rows)
    prompted = []
    real = prompting.encode_prompt
    monkeypatch.setattr(prompting, "encode_prompt", lambda tok, text: prompted.append(real(tok, text)) or prompted[-1])
    rows = [{**r, "completion": "3 + 4 = 7\n\nThe answer is \\boxed{7}."} for r in rows[:2]]
    for prm in ("judge", "mc"):
        label.label_rows(rows, label.Settings(prm=prm, judge_model=bos_model, judge_engine="transformers",
                                              judge_max_new_tokens=3, policy_model=bos_model, engine="transformers",
                                              mc_rollouts=2, mc_max_new_tokens=3))
    assert len(prompted) == 2 * 2 + 2 * 2 and all(ids[0] == bos and ids.count(bos) == 1 for ids in prompted)
    engines.close_engine()


def test_train_prompts_a_base_model_with_bos(bos_model):
    tok = models.load_tokenizer(bos_model)
    example = train.sft_example(tok, {"id": "a", "problem": "Compute 1 + 2.", "completion": "3"}, "minimal")
    assert example.tokens.prompt_ids[0] == tok.bos_token_id
    row = {"prompt": "Problem: x\nSolution:\n", "completion": "1 + 2 = 3", "finish_reason": "stop"}
    assert train.tokenized_text(tok, row)[0][0] == tok.bos_token_id


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
