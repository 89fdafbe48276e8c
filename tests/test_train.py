"""Tests for train.py with real tiny Llama models through real transformers / torch calls.

In-process runs call train.main; exit codes, torchrun (2 gloo ranks, FSDP2) and kill -9 run train.py as a
subprocess. Exact comparisons (two ranks vs one process, resumed vs uninterrupted) use --dtype float64, so
that only a real mismatch can come near the tolerance: in float32, reduction-order noise (different
padding, thread counts) is amplified by Adam, whose first updates are about lr * sign(grad).
"""

import hashlib
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from stepkto import jsonl, models, prompting, scoring, sharding


import train  # noqa: E402
from stepkto.jsonl import DataError  # noqa: E402

TINY = dict(hidden_size=64, num_layers=2, intermediate_size=128)


@pytest.fixture(autouse=True)
def one_thread():
    """Every run uses --num_threads 1 (as fast for these tiny models, and no OpenMP spin-waiting when the
    machine is shared); in-process runs set it globally, so restore it for the other test files."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return models.make_char_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama (char tokenizer): the policy and reference of the KTO tests."""
    path = tmp_path_factory.mktemp("models") / "m0"
    model = models.make_tiny_llama(tokenizer, **TINY, seed=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def label_rows(tokenizer, count=16) -> list[dict]:
    """label.py-style rows: blank-line separated steps, both outcomes, both finish reasons, varied step
    counts, and one completion without any step (the model stopped at once)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(count):
        a, b = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        dots = "." * int(rng.integers(0, 15))
        steps = [f"We add {a} and {b}.", f"{a} + {b} = {a + b}{dots}", f"The answer is {a + b}."]
        steps = steps[: 1 + i % 3]
        completion = "\n\n".join(steps) if i != 5 else "\n"
        steps = prompting.step_texts(completion, prompting.step_spans(completion))
        rows.append({
            "id": f"p{i}#0",
            "prompt": prompting.build_prompt(tokenizer, f"{a} + {b}", "minimal"),
            "completion": completion,
            "finish_reason": "length" if i % 4 == 3 else "stop",
            "outcome": bool(i % 2),
            "completions": steps,
            "labels": [bool(rng.random() < 0.6) for _ in steps],
        })
    return rows


def sft_rows(count=16) -> list[dict]:
    solution = "{i} + {i} = {s}\n\nThe answer is {s}."
    return [{"id": str(i), "problem": f"{i} + {i}", "completion": solution.format(i=i, s=2 * i)} for i in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def run_main(**kwargs) -> Path:
    train.main(train.Args(**kwargs, num_threads=1))
    return Path(kwargs["output_dir"])


def run_script(*argv: str, launcher=(sys.executable,)) -> subprocess.CompletedProcess:
    cmd = [*launcher, str(REPO_ROOT / "train.py"), *argv, "--num_threads", "1"]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def cli(**kwargs) -> list[str]:
    return [part for key, value in kwargs.items() for part in (f"--{key}", str(value))]


def kill_at_first_resume_state(args: dict, out: Path) -> Path:
    """Run train.py with --save_every 2 and SIGKILL it (no cleanup code runs) once the first resume state is
    written; returns that state's path."""
    state = Path(f"{out}.resume") / "state.json"
    command = [sys.executable, str(REPO_ROOT / "train.py"), *cli(**args, save_every=2, output_dir=out, num_threads=1)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.kill()
    assert process.wait() == -9 and state.exists() and not models.is_complete_model_dir(out)
    return state


def dcp_state(folder: Path) -> dict:
    """A torch.distributed.checkpoint folder read whole (torch's own converter, through a temporary file)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder, folder.with_suffix(".pt"))
    state = torch.load(folder.with_suffix(".pt"), weights_only=False)
    flat = {}
    for part in ("model", "optimizer"):
        flat |= {f"{part}.{k}": v for k, v in state.get(part, {}).items() if torch.is_tensor(v)}
    return flat


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in jsonl.jsonl_lines((out / "train_log.jsonl").read_text())]


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- pure functions


def byte_level_bpe_tokenizer():
    """A real multi-character (GPT-2 style byte-level BPE) tokenizer, trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=alphabet)
    corpus = ["First step.\n\nSecond step\n \nThird.", "step by step, the answer is 42.\n\n"] * 20
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.mark.parametrize("which", ["char", "bpe"])
def test_step_ids_follow_character_offsets(which, tokenizer):
    tok = tokenizer if which == "char" else byte_level_bpe_tokenizer()
    # leading whitespace -> step 0; each blank-line separator -> the step before it
    segments = ["  First step.\n\n", "Second step\n \n", "Third."]
    text = "".join(segments)
    row = {"prompt": "p", "completion": text, "finish_reason": "length"}
    _, ids, offsets = train.tokenized_text(tok, row)
    step_ids = train.steps_of_tokens(offsets, prompting.step_spans(text))
    assert len(ids) == len(step_ids)
    if which == "bpe":
        assert len(ids) < len(text)  # multi-character tokens really occur
    for k, segment in enumerate(segments):
        assert tok.decode([t for t, s in zip(ids, step_ids) if s == k]) == segment
    no_steps = train.steps_of_tokens([0, 1], prompting.step_spans(" \n"))
    assert (no_steps == -1).all()


def test_kto_example_appends_eos_to_the_last_step_and_rejects_mismatched_labels(tokenizer):
    row = label_rows(tokenizer)[2]  # three steps, finish_reason "stop"
    example = train.kto_example(tokenizer, row, "f.jsonl:3", with_steps=True)
    tokens = example.tokens
    assert tokens.completion_ids[-1] == tokenizer.eos_token_id and tokens.step_ids[-1] == 2 and tokens.num_steps == 3
    assert tokenizer.decode(tokens.prompt_ids + tokens.completion_ids[:-1]) == row["prompt"] + row["completion"]
    with pytest.raises(DataError, match=r"f\.jsonl:3: field 'labels' has 2 items but the completion has 3 steps"):
        train.kto_example(tokenizer, {**row, "labels": [True, False]}, "f.jsonl:3", with_steps=True)


def real_token_fraction(plan, lengths: list[int], shards: int) -> float:
    """Share of the computed (padded) positions that are real tokens, over every shard's forward of the plan."""
    real = computed = 0
    for batch in plan:
        for part in sharding.chunked(batch.rows, len(batch.rows) // shards):
            part_lengths = [lengths[i] for i in part]
            real, computed = real + sum(part_lengths), computed + len(part) * max(part_lengths)
    return real / computed


def test_plan_is_seeded_length_grouped_and_rank_aligned():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(5.5, 0.6, size=2003), 20, 2000).astype(int).tolist()
    plan = train.build_plan(lengths, global_batch_size=16, shards=2, epochs=2, seed=3, min_batch_size=2)
    assert plan == train.build_plan(lengths, 16, 2, 2, 3, 2) != train.build_plan(lengths, 16, 2, 2, 4, 2)
    for epoch in (0, 1):
        rows = [i for b in plan if b.epoch == epoch for i in b.rows]
        assert len(rows) == len(set(rows)) >= len(lengths) - 1  # each row once; at most shards - 1 dropped
    assert all(len(b.rows) % 2 == 0 and len(b.rows) <= 16 for b in plan)
    grouped = real_token_fraction(plan, lengths, shards=2)
    random_batches = sharding.chunked(rng.permutation(len(lengths)).tolist()[:2000], 16)
    random_plan = [train.PlanBatch(0, batch) for batch in random_batches]
    ungrouped = real_token_fraction(random_plan, lengths, shards=2)
    assert grouped >= 0.9 > ungrouped


@pytest.mark.parametrize("span", ["step", "prefix"])
def test_completion_logps_match_plain_per_row_forwards(span, tiny_model, tokenizer):
    """Padded batch + completion-only LM head vs one unpadded full-logits forward per row."""
    lm = models.load_model(str(tiny_model))
    examples = [train.kto_example(tokenizer, row, f"f:{i}", True) for i, row in enumerate(label_rows(tokenizer, 6))]
    batch = scoring.collate([e.tokens for e in examples], tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        totals, steps = scoring.completion_logps(scoring.CompletionLogProbs(lm), batch, span)  # (B,), (B, K)
        for b, example in enumerate(examples):
            row = example.tokens
            ids = torch.tensor([row.prompt_ids + row.completion_ids])
            logps = lm(ids).logits[0, :-1].double().log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            completion = logps[len(row.prompt_ids) - 1 :]  # (C,)
            # float32 sums of ~100 log-probs: relative 1e-6
            assert totals[b].item() == pytest.approx(completion.sum().item(), rel=1e-6, abs=1e-5)
            for k in range(row.num_steps):
                in_step = (row.step_ids == k) if span == "step" else ((row.step_ids >= 0) & (row.step_ids <= k))
                expected = completion[torch.from_numpy(in_step)].sum().item()
                assert steps[b, k].item() == pytest.approx(expected, rel=1e-6, abs=1e-5)
            if span == "step":  # (with "prefix", padding steps repeat the total: step_mask hides them)
                assert (steps[b, row.num_steps :] == 0).all()


def test_chunked_lm_head_gives_the_same_log_probs_and_gradients(tiny_model, tokenizer):
    """--logits_chunk_mib: chunks of 5 tokens (checkpointed) vs one chunk, float64, values and gradients."""
    examples = [train.kto_example(tokenizer, row, f"f:{i}", True) for i, row in enumerate(label_rows(tokenizer, 6))]
    batch = scoring.collate([e.tokens for e in examples], tokenizer.pad_token_id, torch.device("cpu"))
    results = []
    vocab = len(tokenizer)
    for chunk_mib in (0, 5.5 * 4 * vocab / 2**20):  # 5.5 tokens' float32 logits: chunks of 5
        scorer = scoring.CompletionLogProbs(models.load_model(str(tiny_model), "float64"), chunk_mib)
        assert scorer.chunk_tokens == (5 if chunk_mib else 0)
        logps = scorer(batch.input_ids, batch.attention_mask, batch.positions, batch.targets)  # (N,)
        (logps * torch.linspace(0.5, 2.0, len(logps), dtype=torch.float64)).sum().backward()
        results.append((logps.detach(), {n: p.grad for n, p in scorer.named_parameters()}))
    (whole, whole_grads), (chunked, chunked_grads) = results
    assert len(whole) > 5 * 10  # many chunks
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- training runs


def test_sft_from_scratch_learns_and_saves_a_loadable_checkpoint(tmp_path, tokenizer, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    args = dict(objective="sft", model="scratch", data=str(data), output_dir=str(tmp_path / "M0"),
                prompt_style="minimal", **TINY, lr=3e-3, epochs=12, per_device_batch_size=4, log_every=1,
                save_every=5, seed=7)
    out = run_main(**args)
    losses = [entry["loss/total"] for entry in read_log(out)]
    assert len(losses) == 48 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8])
    assert models.is_complete_model_dir(out) and not Path(f"{out}.resume").exists() and not Path(f"{out}.tmp").exists()

    tok, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    fresh = models.make_tiny_llama(tok, **TINY, seed=7)  # the same init the run started from
    prompt = tok(prompting.build_prompt(tok, "3 + 3", "minimal")).input_ids
    ids = torch.tensor([prompt + tok(sft_rows()[3]["completion"]).input_ids + [tok.eos_token_id]])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100  # the NLL of what SFT trains: the completion + EOS
    with torch.no_grad():
        assert model(ids, labels=labels).loss < 0.6 * fresh(ids, labels=labels).loss

    before = tree_digest(out)
    run_main(**args)  # complete output: nothing to do, nothing touched
    assert "already a complete checkpoint" in capsys.readouterr().out and tree_digest(out) == before

    # the default tokenizer has the task's fixed strings as tokens; --scratch_tokenizer char one per character
    assert tok.tokenize("12 + 7 = 19") == ["1", "2", " + ", "7", " = ", "1", "9"]
    char = run_main(**{**args, "scratch_tokenizer": "char", "epochs": 1, "output_dir": str(tmp_path / "M0char")})
    assert AutoTokenizer.from_pretrained(char).tokenize("2 + 7") == ["2", " ", "+", " ", "7"]


def test_kto_and_step_kto_train_one_epoch_and_step_kto_without_steps_is_kto(tmp_path, tiny_model, tokenizer):
    data = write_jsonl(tmp_path / "labels.jsonl", label_rows(tokenizer))
    common_args = dict(model=str(tiny_model), data=str(data), per_device_batch_size=4, lr=1e-3, log_every=1, nll_weight=0.0)
    logs = {}
    for name, extra in {"kto": dict(objective="kto"), "step-kto": dict(objective="step-kto"),
                        "step-kto-w0": dict(objective="step-kto", w_step=0.0)}.items():
        logs[name] = read_log(run_main(**common_args, **extra, output_dir=str(tmp_path / name)))
    for log in logs.values():
        assert len(log) == 4 and all(math.isfinite(e["loss/total"]) and math.isfinite(e["kl/z0"]) for e in log)
    first, later = logs["step-kto"][0], logs["step-kto"][1:]
    # Before the first update the policy IS the reference: every row's cached log pi_ref matches its own row.
    sides = ("outcome_desirable", "outcome_undesirable", "step_desirable", "step_undesirable")
    assert all(first[f"rewards/{side}"] == 0.0 for side in sides)
    assert all(e["rewards/outcome_desirable"] != 0.0 for e in later)
    kto_losses = [e["loss/total"] for e in logs["kto"]]
    assert kto_losses == pytest.approx([e["loss/total"] for e in logs["step-kto-w0"]], abs=1e-7)
    for entry in logs["step-kto"]:
        assert "loss/step" in entry and entry["loss/total"] == pytest.approx(entry["loss/outcome"] + entry["loss/step"])
    assert "loss/step" not in logs["kto"][0] and "loss/step" not in logs["step-kto-w0"][0]


def test_nll_anchor_is_the_mean_nll_of_the_fully_desirable_completions(tmp_path, tiny_model, tokenizer):
    rows = label_rows(tokenizer)
    data = write_jsonl(tmp_path / "labels.jsonl", rows)
    base = dict(model=str(tiny_model), data=str(data), per_device_batch_size=16, lr=1e-3, log_every=1, max_steps=1)
    model = models.load_model(str(tiny_model))
    for objective in ("kto", "step-kto"):
        first = read_log(run_main(**base, objective=objective, nll_weight=2.0, output_dir=str(tmp_path / objective)))[0]
        kept = [r for r in rows if r["outcome"] and (objective == "kto" or all(r["labels"]))]
        assert 0 < len(kept) < len(rows)
        logps, tokens = 0.0, 0
        for r in kept:  # independent check: the plain model's NLL over the kept completions (+ EOS if stopped)
            prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
            completion += [tokenizer.eos_token_id] if r["finish_reason"] == "stop" else []
            with torch.no_grad():
                logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            logps += logits.log_softmax(-1).gather(1, torch.tensor(completion)[:, None]).sum().item()
            tokens += len(completion)
        assert first["loss/nll"] == pytest.approx(-logps / tokens, rel=1e-4)
        levels = first["loss/outcome"] + first.get("loss/step", 0.0)
        assert first["loss/total"] == pytest.approx(levels + 2.0 * first["loss/nll"], rel=1e-5)


def test_labels_after_the_first_wrong_step_matter_only_with_step_scope_all(tmp_path, tiny_model, tokenizer):
    rows = label_rows(tokenizer)
    flipped = [dict(r, labels=r["labels"][: r["labels"].index(False) + 1]
                    + [not x for x in r["labels"][r["labels"].index(False) + 1:]]) if False in r["labels"] else r
               for r in rows]
    assert flipped != rows
    base = dict(objective="step-kto", model=str(tiny_model), per_device_batch_size=8, lr=1e-3, log_every=1,
                nll_weight=1.0)
    losses = {}
    for scope in ("first_error", "all"):
        for name, data in (("orig", rows), ("flipped", flipped)):
            path = write_jsonl(tmp_path / f"{name}.jsonl", data)
            out = run_main(**base, step_scope=scope, data=str(path), output_dir=str(tmp_path / f"{scope}-{name}"))
            losses[scope, name] = [e["loss/total"] for e in read_log(out)]
    assert losses["first_error", "orig"] == pytest.approx(losses["first_error", "flipped"], abs=1e-7)
    assert losses["all", "orig"] != pytest.approx(losses["all", "flipped"], abs=1e-4)


def test_separate_reference_model_is_used_and_freed(tmp_path, tiny_model, tokenizer):
    reference = tmp_path / "ref"
    models.make_tiny_llama(tokenizer, **TINY, seed=2).save_pretrained(reference)
    tokenizer.save_pretrained(reference)
    data = write_jsonl(tmp_path / "labels.jsonl", label_rows(tokenizer))
    out = run_main(objective="step-kto", model=str(tiny_model), ref_model=str(reference), data=str(data),
                   output_dir=str(tmp_path / "out"), per_device_batch_size=4, lr=1e-3, log_every=1)
    first = read_log(out)[0]
    # pi != pi_ref from the first step on: rewards and z0 are live (the same run with pi_ref = pi logs 0)
    assert first["rewards/outcome_desirable"] != 0.0 and first["rewards/step_undesirable"] != 0.0
    assert all(math.isfinite(e["loss/total"]) for e in read_log(out))


@pytest.mark.parametrize("objective", ["step-kto", "sft"])
def test_fsdp_two_ranks_match_one_process_on_the_same_global_batch(objective, tmp_path, tiny_model, tokenizer):
    # One row has no step (the step level's mean then covers 15 of 16 rows, unevenly split over the ranks).
    rows = label_rows(tokenizer) if objective == "step-kto" else sft_rows()
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    args = dict(objective=objective, model=str(tiny_model), data=str(data), epochs=2, lr=1e-3, log_every=1,
                dtype="float64")
    args |= dict(step_z0="step", nll_weight=0.5) if objective == "step-kto" else dict(prompt_style="minimal")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    # the two ranks also chunk the LM head (checkpointed chunks under FSDP2); the one process does not
    two = cli(**args, per_device_batch_size=2, output_dir=tmp_path / "two", logits_chunk_mib=7 * 4 * len(tokenizer) / 2**20)
    result = run_script(*two, launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    single = run_main(**args, per_device_batch_size=4, output_dir=str(tmp_path / "one"), logits_chunk_mib=0)
    two_log, one_log = read_log(tmp_path / "two"), read_log(single)
    assert len(two_log) == len(one_log) == 8
    for two, one in zip(two_log, one_log):
        assert two.keys() == one.keys()
        for key in one:
            if key.startswith(("loss/", "rewards/", "count/", "kl/", "grad_norm", "lr")):
                assert two[key] == pytest.approx(one[key], abs=1e-5), (one["step"], key)
    two_weights = load_file(tmp_path / "two" / "model.safetensors")
    one_weights = load_file(single / "model.safetensors")
    initial = load_file(tiny_model / "model.safetensors")
    assert two_weights.keys() == one_weights.keys() == initial.keys()
    for key in one_weights:
        torch.testing.assert_close(two_weights[key], one_weights[key], rtol=0, atol=1e-5)
        assert not torch.equal(one_weights[key], initial[key].to(torch.float64)), key  # every tensor was trained


def test_torchrun_with_one_process_shards_and_matches_plain_python(tmp_path, tiny_model, tokenizer):
    """FSDP2 on a 1-process mesh (one GPU) trains exactly what plain `python train.py` trains."""
    data = write_jsonl(tmp_path / "data.jsonl", label_rows(tokenizer))
    args = dict(objective="step-kto", model=str(tiny_model), data=str(data), lr=1e-3, log_every=1, dtype="float64",
                per_device_batch_size=4)
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1")
    result = run_script(*cli(**args, output_dir=tmp_path / "fsdp"), launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    plain = run_main(**args, output_dir=str(tmp_path / "plain"))
    assert json.loads((tmp_path / "fsdp" / "train_args.json").read_text())["world_size"] == 1
    for fsdp, one in zip(read_log(tmp_path / "fsdp"), read_log(plain), strict=True):
        assert fsdp["loss/total"] == pytest.approx(one["loss/total"], abs=1e-10)
    fsdp_weights, plain_weights = load_file(tmp_path / "fsdp" / "model.safetensors"), load_file(plain / "model.safetensors")
    for key in plain_weights:
        torch.testing.assert_close(fsdp_weights[key], plain_weights[key], rtol=0, atol=1e-10)


def test_resume_after_kill_ends_with_the_uninterrupted_parameters(tmp_path, tiny_model, tokenizer):
    data = write_jsonl(tmp_path / "labels.jsonl", label_rows(tokenizer))
    args = dict(objective="step-kto", model=str(tiny_model), data=str(data), epochs=5, lr=1e-3, per_device_batch_size=4,
                log_every=1, dtype="float64")
    out = tmp_path / "killed"
    kill_at_first_resume_state(args, out)

    resumed = run_script(*cli(**args, save_every=2, output_dir=out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "reference log-probs: loaded from" in resumed.stdout

    uninterrupted = run_main(**args, save_every=0, output_dir=str(tmp_path / "uninterrupted"))
    resumed_losses = [e["loss/total"] for e in read_log(out)]
    assert resumed_losses == pytest.approx([e["loss/total"] for e in read_log(uninterrupted)], abs=1e-12)
    resumed_weights = load_file(out / "model.safetensors")
    reference_weights = load_file(uninterrupted / "model.safetensors")
    for key in reference_weights:
        torch.testing.assert_close(resumed_weights[key], reference_weights[key], rtol=0, atol=1e-12)


def test_non_finite_loss_stops_with_an_error_and_touches_no_checkpoint(tmp_path, tiny_model, tokenizer):
    data = write_jsonl(tmp_path / "labels.jsonl", label_rows(tokenizer))
    before = tree_digest(tiny_model)
    out = tmp_path / "diverged"
    # A huge learning rate is a genuine way to diverge: step 1 is finite, then the weights overflow.
    result = run_script(*cli(objective="kto", model=tiny_model, data=data, output_dir=out, lr=1e30, warmup_ratio=0,
                             per_device_batch_size=4, save_every=1))
    assert result.returncode != 0
    message = result.stderr
    assert "step 2: the" in message and ("is nan" in message or "is inf" in message), message[-2000:]
    assert tree_digest(tiny_model) == before and not out.exists() and not Path(f"{out}.tmp").exists()
    work = Path(f"{out}.resume")
    assert jsonl.read_json(work / "state.json")["step"] == 1  # the last resume state is the finite step 1's
    state = dcp_state(work / "state-1")
    assert state and all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("model."))


def test_refuses_to_write_over_its_own_input(tiny_model, tmp_path):
    with pytest.raises(train.UsageError, match="would overwrite its own input"):
        run_main(objective="kto", model=str(tiny_model), data=str(tmp_path / "x.jsonl"), output_dir=str(tiny_model))


MALFORMED = {
    # name: (how to break the second row (file line 3, after a blank line), expected message)
    "bad_json": (lambda row: json.dumps(row)[:-5], r":3: invalid JSON"),
    "missing_field": (
        lambda row: json.dumps({k: v for k, v in row.items() if k != "outcome"}),
        r":3: missing field 'outcome'",
    ),
    "steps_labels_mismatch": (
        lambda row: json.dumps({**row, "labels": row["labels"] + [True]}),
        r":3: field 'labels' has 2 items but the completion has 1 steps",
    ),
    "bad_finish_reason": (
        lambda row: json.dumps({**row, "finish_reason": "eos"}),
        r":3: field 'finish_reason' must be",
    ),
    "label_not_a_verdict": (
        lambda row: json.dumps({**row, "labels": ["yes"] * len(row["labels"])}),
        r":3: field 'labels' must be a list of booleans and nulls",
    ),
}


def write_malformed(tmp_path: Path, tokenizer, case: str) -> Path:
    rows = label_rows(tokenizer, count=8)
    lines = [json.dumps(rows[0]), "", MALFORMED[case][0](rows[3])] + [json.dumps(row) for row in rows[4:]]
    path = tmp_path / f"{case}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_label_file_names_file_line_and_field(case, tmp_path, tiny_model, tokenizer):
    data = write_malformed(tmp_path, tokenizer, case)
    with pytest.raises(DataError, match=re.escape(str(data)) + MALFORMED[case][1]):
        run_main(objective="step-kto", model=str(tiny_model), data=str(data), output_dir=str(tmp_path / "out"))


def test_malformed_label_file_exits_non_zero_from_the_command_line(tmp_path, tiny_model, tokenizer):
    data = write_malformed(tmp_path, tokenizer, "steps_labels_mismatch")
    result = run_script(*cli(objective="step-kto", model=tiny_model, data=data, output_dir=tmp_path / "out"))
    assert result.returncode == 1
    assert f"{data}:3: field 'labels'" in result.stderr and "Traceback" not in result.stderr


def test_balanced_lambdas_follow_the_kto_paper_rule():
    """lambda_D * n_D == lambda_U * n_U, the larger side weighted down; one-sided data keeps 1, 1."""
    assert train.balanced_lambdas(10, 30) == (1.0, 10 / 30)
    assert train.balanced_lambdas(30, 10) == (10 / 30, 1.0)
    assert train.balanced_lambdas(0, 5) == (1.0, 1.0)
    d, u = train.balanced_lambdas(7, 93)
    assert abs(d * 7 - u * 93) < 1e-9


UNJUDGED_LABELS = [[None], [True, None], [None, False, True], [True]]  # outcomes False, True, False, True


def unjudged_step_inputs(tmp_path, tokenizer, **options):
    """One global batch of the four rows of UNJUDGED_LABELS (null: no verdict), as train.step_inputs prepares it
    (a zero reference: no model), with the step labels and masks of each row by its index in the file."""
    rows = [dict(row, labels=labels) for row, labels in zip(label_rows(tokenizer, 4), UNJUDGED_LABELS)]
    args = train.Args(objective="step-kto", model="unused", output_dir="unused", per_device_batch_size=4,
                      data=str(write_jsonl(tmp_path / "labels.jsonl", rows)), **options)
    env = train.Env(0, 1, torch.device("cpu"))
    data = train.prepare_data(args, env, tokenizer)
    data.reference = scoring.Reference(torch.zeros(4), torch.zeros(4, 3), torch.zeros(4), torch.zeros(4, 0))
    inputs = train.step_inputs(0, data, args, env)
    [micro] = inputs.micro
    order = [data.plan[0].rows.index(i) for i in range(4)]
    masks = [micro.step_mask[b, : len(UNJUDGED_LABELS[i])].tolist() for i, b in enumerate(order)]
    labels = [micro.step_labels[b, : len(UNJUDGED_LABELS[i])].tolist() for i, b in enumerate(order)]
    return data, inputs, masks, labels, [micro.anchored[b].item() for b in order]


def test_a_step_without_a_verdict_takes_no_part_in_the_step_level_by_default(tmp_path, tokenizer):
    """--unjudged_steps ignore: a null step is out of the step mask (and of the balanced lambdas and of the count of
    completions with a scored step); wrong: it is scored as an undesirable step, as a False label."""
    data, inputs, masks, labels, anchored = unjudged_step_inputs(tmp_path, tokenizer)
    assert masks == [[False], [True, False], [False, True, True], [True]]
    assert [[x for x, m in zip(row, mask) if m] for row, mask in zip(labels, masks)] == [[], [True], [False, True], [True]]
    assert inputs.n_step.item() == 3  # the first row has no judged step
    assert data.lambdas["step_lambda_d"] == pytest.approx(1 / 3) and data.lambdas["step_lambda_u"] == 1.0  # 3 vs 1
    assert anchored == [False, False, False, True]  # the anchor: right answer and every step judged right
    _, _, first_error, _, _ = unjudged_step_inputs(tmp_path, tokenizer, step_scope="first_error")
    assert first_error == [[False], [True, False], [False, True, False], [True]]  # the first wrong among the judged

    data, inputs, masks, labels, anchored = unjudged_step_inputs(tmp_path, tokenizer, unjudged_steps="wrong")
    assert masks == [[True], [True, True], [True, True, True], [True]]
    assert labels == [[False], [True, False], [False, False, True], [True]]
    assert inputs.n_step.item() == 4
    assert data.lambdas["step_lambda_d"] == 1.0 and data.lambdas["step_lambda_u"] == pytest.approx(3 / 4)  # 3 vs 4
    assert anchored == [False, False, False, True]
