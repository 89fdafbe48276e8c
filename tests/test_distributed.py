"""train.py at scale, simulated with gloo ranks on this CPU: the policy loaded from rank 0 into FSDP2 shards, bf16
mixed precision by FSDP2's policy, the sharded resume state after kill -9 of one rank, two "nodes" on localhost,
and one clear error when the ranks do not share their output folder. On SmolLM2-135M-Instruct (models/, by
`bash setup.sh --models`) and on a tiny Llama."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepkto import jsonl, models
from test_train import cli, label_rows, read_log, run_main, tiny_model, tokenizer, write_jsonl  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
needs_smollm2 = pytest.mark.skipif(not SMOLLM2.exists() and not os.environ.get("STEPKTO_REQUIRE_REAL_MODEL"),
                                   reason=f"{SMOLLM2} is absent: run `bash setup.sh --models`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *, nnodes: int = 1, node_rank: int = 0, port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port or free_port()}"]


def train_command(launcher: list[str], args: dict) -> list[str]:
    return [*launcher, str(REPO / "train.py"), *cli(**args, num_threads=1)]


def run_ok(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_one_rank_at_first_state(args: dict, out: Path) -> None:
    """2 ranks under torchrun with --save_every 1; once the first resume state is complete, SIGKILL rank 1's
    process (no cleanup runs), which ends the job."""
    job = subprocess.Popen(train_command(torchrun(2), {**args, "output_dir": out, "save_every": 1}), cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    pointer, deadline = Path(f"{out}.resume") / "state.json", time.monotonic() + 300
    while not pointer.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    ranks = {int(open(f"/proc/{pid}/environ").read().split("RANK=")[1].split("\0")[0]): int(pid) for pid in workers
             if "\0RANK=" in open(f"/proc/{pid}/environ").read()}
    os.kill(ranks[1], signal.SIGKILL)
    assert job.wait(timeout=300) != 0 and pointer.exists() and not models.is_complete_model_dir(out)


def weights_close(a: Path, b: Path, atol: float) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=atol)


def smollm2_rows(tmp_path: Path) -> Path:
    """8 step-kto rows in SmolLM2's chat template (text only: train.py tokenizes them)."""
    tokenizer = models.load_tokenizer(str(SMOLLM2))
    rows = label_rows(tokenizer, count=8)
    return write_jsonl(tmp_path / "labels.jsonl", rows)


@needs_smollm2
def test_smollm2_two_ranks_killed_and_resumed_equal_one_process(tmp_path):
    """float64, where sharding must not change a digit: rank 0 loads SmolLM2 and broadcasts its shards, a kill -9
    of rank 1 after step 1, a rerun from the sharded state, and the weights of one uninterrupted process."""
    args = dict(objective="step-kto", model=str(SMOLLM2), data=str(smollm2_rows(tmp_path)), epochs=2, lr=1e-5,
                log_every=1, dtype="float64", per_device_batch_size=2, optim="adamw_fused")
    out = tmp_path / "two"
    kill_one_rank_at_first_state(args, out)
    state = Path(f"{out}.resume") / "state-1"  # each rank wrote its own shards and RNG
    assert len(list(state.glob("*.distcp"))) == 2 and {p.name for p in state.glob("rank*.pt")} == {"rank0.pt", "rank1.pt"}
    resumed = run_ok(train_command(torchrun(2), {**args, "output_dir": out, "save_every": 1}))
    assert "resuming from" in resumed.stdout
    single = run_main(**{**args, "per_device_batch_size": 4}, output_dir=str(tmp_path / "one"))
    two_log, one_log = read_log(out), read_log(single)
    assert two_log[0]["loss/total"] == pytest.approx(one_log[0]["loss/total"], abs=1e-12)  # before any update
    for two, one in zip(two_log, one_log, strict=True):  # then AdamW magnifies float64 rounding, still tiny
        assert two["loss/total"] == pytest.approx(one["loss/total"], rel=1e-6)
    weights_close(out, single, atol=1e-8)  # measured: 1.7e-9 apart, while training moved them by up to 2.5e-5


@needs_smollm2
def test_smollm2_mixed_precision_two_ranks_equal_one_rank(tmp_path):
    """bf16 compute through FSDP2's MixedPrecisionPolicy: 2 ranks against 1 rank that accumulates the same two
    micro-batches (so that every bf16 forward sees the same rows), up to the order of the reduction."""
    args = dict(objective="step-kto", model=str(SMOLLM2), data=str(smollm2_rows(tmp_path)), lr=1e-5, log_every=1,
                dtype="float32", mixed_precision="bfloat16", optim="adamw_fused")
    run_ok(train_command(torchrun(2), {**args, "per_device_batch_size": 2, "output_dir": tmp_path / "two"}))
    run_ok(train_command(torchrun(1), {**args, "per_device_batch_size": 2, "gradient_accumulation_steps": 2,
                                       "output_dir": tmp_path / "one"}))
    for two, one in zip(read_log(tmp_path / "two"), read_log(tmp_path / "one"), strict=True):
        assert two["loss/total"] == pytest.approx(one["loss/total"], rel=1e-3)
    base, two, one = (load_file(p / "model.safetensors") for p in (SMOLLM2, tmp_path / "two", tmp_path / "one"))
    moved = sum(((one[k] - base[k]) ** 2).sum().item() for k in one) ** 0.5
    apart = sum(((two[k] - one[k]) ** 2).sum().item() for k in one) ** 0.5
    assert moved > 0 and apart < 0.1 * moved, (moved, apart)


def two_nodes(args: dict, outputs: tuple[Path, Path]) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --nproc_per_node 1` twice on this machine, node 0 and node 1, one rendezvous."""
    port = free_port()
    jobs = [subprocess.Popen(train_command(torchrun(1, nnodes=2, node_rank=node, port=port),
                                           {**args, "output_dir": outputs[node]}),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    results = []
    for job in jobs:
        out, err = job.communicate(timeout=300)  # a hang fails here
        results.append(subprocess.CompletedProcess(job.args, job.returncode, out, err))
    return results


def test_two_nodes_on_localhost_equal_one_process(tmp_path, tiny_model, tokenizer):
    args = dict(objective="step-kto", model=str(tiny_model), data=str(write_jsonl(tmp_path / "d.jsonl", label_rows(tokenizer))),
                lr=1e-3, log_every=1, dtype="float64", per_device_batch_size=2)
    out = tmp_path / "two_nodes"
    for result in two_nodes(args, (out, out)):
        assert result.returncode == 0, result.stderr[-3000:]
    single = run_main(**{**args, "per_device_batch_size": 4}, output_dir=str(tmp_path / "one"))
    for two, one in zip(read_log(out), read_log(single), strict=True):
        assert two["loss/total"] == pytest.approx(one["loss/total"], abs=1e-10)
    weights_close(out, single, atol=1e-10)


def test_nodes_with_different_output_folders_stop_with_one_error(tmp_path, tiny_model, tokenizer):
    """As on node-local disks: each rank would decide from its own files. Both stop, with one line, no hang."""
    args = dict(objective="step-kto", model=str(tiny_model), data=str(write_jsonl(tmp_path / "d.jsonl", label_rows(tokenizer))),
                lr=1e-3, per_device_batch_size=2)
    results = two_nodes(args, (tmp_path / "node0" / "M1", tmp_path / "node1" / "M1"))
    for result in results:
        assert result.returncode != 0
    errors = [line for r in results for line in r.stderr.splitlines() if line.startswith("train.py: error:")]
    assert errors and all("not one folder shared by every rank" in e for e in errors), results[0].stderr[-2000:]
    assert not any(jsonl.read_complete_rows(p) for p in tmp_path.glob("node*/M1/*.jsonl"))


FENCE_WORKER = '''
import json, os, runpy, sys
import torch.distributed as dist
import transformers

save = transformers.PreTrainedModel.save_pretrained

def recording_save(self, *args, **kwargs):  # what the process group is when a rank writes the model
    with open(os.environ["FENCE_LOG"], "a") as f:
        f.write(json.dumps({"rank": int(os.environ["RANK"]), "in_group": dist.is_initialized()}) + "\\n")
    return save(self, *args, **kwargs)

transformers.PreTrainedModel.save_pretrained = recording_save
sys.argv = [sys.argv[1], *sys.argv[2:]]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as when train.py runs as the script
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_every_rank_leaves_the_group_before_rank_0_writes(tmp_path, tiny_model, tokenizer):
    """The fence against gloo's teardown race (pytorch/pytorch issues 190489, 75529, 65231): after the last
    all-gather every rank meets a barrier and destroys its process group, and only then does rank 0 write the
    model, alone; no rank exits while a peer is still inside the group."""
    worker, log = tmp_path / "worker.py", tmp_path / "fence.jsonl"
    worker.write_text(FENCE_WORKER)
    args = dict(objective="step-kto", model=str(tiny_model), output_dir=str(tmp_path / "M1"), per_device_batch_size=2,
                data=str(write_jsonl(tmp_path / "d.jsonl", label_rows(tokenizer))), lr=1e-3)
    command = [*torchrun(2), str(worker), str(REPO / "train.py"), *cli(**args, num_threads=1)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "FENCE_LOG": str(log)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line) for line in jsonl.jsonl_lines(log.read_text())] == [{"rank": 0, "in_group": False}]
    assert models.is_complete_model_dir(tmp_path / "M1")
