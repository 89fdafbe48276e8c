"""train.py --objective kto vs TRL's KTOTrainer on the same work: speed, peak memory, step-0 loss.

    .venv/bin/python bench/bench_train_vs_trl.py [--rounds 2] [--steps 32] [--model 14m|task]

Run twice over: both without activation checkpointing, then both with it (TRL's KTOConfig defaults to
gradient_checkpointing=True, train.py to False; an earlier version of this bench compared the two defaults).

Same model (a saved random-init tiny Llama, char tokenizer, float32), same KTO JSONL (arith_task problems,
half of the solutions corrupted into wrong answers), same batch size, steps, lr, beta, linear decay without
warmup, grad clip 1.0, one torch thread, reference log-probs computed once before training (TRL:
precompute_ref_log_probs=True). TRL gets its rows in the order of train.py's batch plan with a sequential
sampler, so both see the same batches; TRL builds its KL pairs by rotating completions within each batch,
as train.py does, so the two losses must agree at every step, not only the first.

Each trainer runs in its own subprocess (peak RSS from os.wait4's rusage of that child), alternating
ours, TRL, ours, TRL, ... The timed region starts after the imports: ours = train.main (tokenize, plan,
reference pass, training, final save_pretrained); TRL = load model, KTOTrainer(...) (tokenize, reference
pass), trainer.train(). "train loop" = train.train vs trainer.train() alone.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODELS = {  # --model: a 10-20M random-init Llama, or the embedded default's tiny task model (run.sh's sizes)
    "14m": dict(hidden_size=384, num_layers=6, intermediate_size=1536),  # 14.2M parameters, 6 heads of 64
    "task": dict(hidden_size=128, num_layers=2, intermediate_size=384),  # run.sh HIDDEN/LAYERS/FFN
}
ROWS, BATCH, LR, BETA = 256, 8, 1e-5, 0.1


def clock():
    return time.perf_counter(), time.process_time()


def since(start):
    wall, cpu = clock()
    return {"wall": wall - start[0], "cpu": cpu - start[1]}


def worker_ours(work: Path, run: str, steps: int, checkpointing: bool) -> dict:
    import train

    phases, inner = {}, train.train

    def timed_train(*args, **kwargs):  # time the training loop alone
        start = clock()
        inner(*args, **kwargs)
        phases["loop"] = since(start)

    train.train = timed_train
    out = work / f"ours_{run}"
    args = train.Args(objective="kto", model=str(work / "model"), data=str(work / "data.jsonl"), output_dir=str(out),
                      per_device_batch_size=BATCH, max_steps=steps, lr=LR, beta=BETA, warmup_ratio=0.0,
                      log_every=1, save_every=0, num_threads=1, seed=0, gradient_checkpointing=checkpointing)
    start = clock()
    train.main(args)
    phases["total"] = since(start)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {**phases, "losses": [e["loss/total"] for e in log], "grad_norm0": log[0]["grad_norm"]}


def worker_trl(work: Path, run: str, steps: int, checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import KTOConfig, KTOTrainer

    torch.set_num_threads(1)
    rows = [json.loads(line) for line in (work / "data_plan_order.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"], "label": r["outcome"]}
                                 for r in rows])
    config = KTOConfig(output_dir=str(work / f"trl_{run}"), per_device_train_batch_size=BATCH, max_steps=steps,
                       learning_rate=LR, beta=BETA, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
                       logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
                       max_length=None, disable_tqdm=True, precompute_ref_log_probs=True,
                       train_sampling_strategy="sequential", seed=0, dataloader_num_workers=0,
                       bf16=False,  # TRL defaults to bf16 autocast; train.py here computes in float32
                       gradient_checkpointing=checkpointing)  # TRL defaults to True; train.py to False
    start = clock()
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = LlamaForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    trainer = KTOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    loop = clock()
    trainer.train()
    result = {"loop": since(loop), "total": since(start)}
    # Same tokens as train.py: tokenize(prompt) + tokenize(completion) + EOS (finish_reason "stop").
    same_tokens = all(
        ex["prompt_ids"] + ex["completion_ids"]
        == tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
        + tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for ex, r in zip(trainer.train_dataset, rows))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    grad_norm0 = trainer.state.log_history[0]["grad_norm"]
    return {**result, "losses": losses, "same_tokens": same_tokens, "grad_norm0": grad_norm0}


def prepare(work: Path, model_name: str) -> None:
    """Model, KTO JSONL, and the same rows in the order of train.py's batch plan (for TRL)."""
    import arith_task
    import common
    import train

    tokenizer = common.make_char_tokenizer()
    model = common.make_tiny_llama(tokenizer, **MODELS[model_name], seed=0)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    problems = arith_task.make_split("train", ROWS, seed=0, shape="chain", max_number=20, min_ops=2, max_ops=5)
    rng, rows = random.Random(0), []
    for i, p in enumerate(problems):
        good = i % 2 == 0  # half desirable: train.py's balanced lambdas are then 1, 1 (TRL's defaults)
        wrong = str(int(p["answer"]) + rng.choice([-3, -2, -1, 1, 2, 3]))
        completion = p["solution"] if good else p["solution"].replace(f"\\boxed{{{p['answer']}}}", f"\\boxed{{{wrong}}}")
        rows.append({"id": p["id"], "prompt": common.build_prompt(tokenizer, p["problem"], "minimal"),
                     "completion": completion, "finish_reason": "stop", "outcome": good})
    write = lambda path, rs: path.write_text("".join(json.dumps(r) + "\n" for r in rs))  # noqa: E731
    write(work / "data.jsonl", rows)
    args = train.Args(objective="kto", model=str(work / "model"), data=str(work / "data.jsonl"), output_dir="-",
                      per_device_batch_size=BATCH, seed=0)
    plan = train.prepare_data(args, train.Env(0, 1, model.device), tokenizer).plan
    write(work / "data_plan_order.jsonl", [rows[i] for batch in plan for i in batch.rows])
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; {ROWS} rows; "
          f"{len(plan)} batches of {BATCH}", flush=True)


def run_child(name: str, work: Path, run: str, steps: int, checkpointing: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), "--run", run, "--steps", str(steps)]
    cmd += ["--checkpointing"] if checkpointing else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"{name}_{run}.err", "w"))
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        sys.exit(f"{name} run {run} failed, see {work / f'{name}_{run}.err'}")
    result = json.loads((work / f"{name}_{run}.json").read_text())
    return {**result, "rss_mib": usage.ru_maxrss / 1024, "process_cpu": usage.ru_utime + usage.ru_stime}


def compare(work: Path, rounds: int, steps: int, checkpointing: bool) -> None:
    """Ours and TRL alternating, `rounds` times each, both with or both without activation checkpointing."""
    results = {"ours": [], "trl": []}
    tag = "with" if checkpointing else "without"
    for r in range(rounds):
        for name in results:
            results[name].append(run_child(name, work, f"{tag}{r}", steps, checkpointing))
            res = results[name][-1]
            print(f"{tag} checkpointing, round {r} {name}: loop {res['loop']['wall']:.1f} s wall / "
                  f"{res['loop']['cpu']:.1f} s CPU, total {res['total']['wall']:.1f} s, peak RSS {res['rss_mib']:.0f} MiB",
                  flush=True)
    samples = steps * BATCH
    print(f"\n{tag} activation checkpointing (both sides)")
    print("| trainer | train loop samples/s (wall) | (CPU) | end-to-end samples/s (wall) | (CPU) | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|")
    best = {}
    for name, runs in results.items():
        best[name] = {f"{p}_{k}": samples / min(x[p][k] for x in runs)  # fastest run of each: least noise
                      for p in ("loop", "total") for k in ("wall", "cpu")}
        best[name]["rss"] = max(x["rss_mib"] for x in runs)
        b = best[name]
        print(f"| {name} | {b['loop_wall']:.2f} | {b['loop_cpu']:.2f} | {b['total_wall']:.2f} | {b['total_cpu']:.2f} "
              f"| {b['rss']:.0f} |")
    print("ratio ours/TRL: " + ", ".join(f"{k} {best['ours'][k] / best['trl'][k]:.2f}x" for k in best["ours"]))
    ours, trl = results["ours"][0]["losses"], results["trl"][0]["losses"]
    diffs = [abs(a - b) for a, b in zip(ours, trl)]
    print(f"same tokens as train.py in TRL's dataset: {results['trl'][0]['same_tokens']}")
    print(f"loss at step 0: ours {ours[0]:.6f}, TRL {trl[0]:.6f}, |diff| {diffs[0]:.2e} "
          f"({'OK' if diffs[0] < 1e-4 else 'MISMATCH'}); max |diff| over {len(diffs)} steps {max(diffs):.2e}")
    # At step 0 the policy IS the reference: every log-ratio and z0 are 0 and both losses are exactly
    # sigmoid(0) = 0.5 whatever the pairing; the gradient norm at step 0 and the later losses are the real check.
    g_ours, g_trl = results["ours"][0]["grad_norm0"], results["trl"][0]["grad_norm0"]
    print(f"grad norm at step 0: ours {g_ours:.6f}, TRL {g_trl:.6f}, rel diff {abs(g_ours - g_trl) / g_trl:.1e}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=ROWS // BATCH)
    parser.add_argument("--work", default="/tmp/bench_train_vs_trl")
    parser.add_argument("--worker", choices=["ours", "trl"])
    parser.add_argument("--run", default="0")
    parser.add_argument("--checkpointing", action="store_true", help="worker: activation checkpointing")
    parser.add_argument("--model", choices=sorted(MODELS), default="14m", help="which random-init model")
    opts = parser.parse_args()
    work = Path(opts.work)
    if opts.worker:
        worker = worker_ours if opts.worker == "ours" else worker_trl
        result = worker(work, opts.run, opts.steps, opts.checkpointing)
        (work / f"{opts.worker}_{opts.run}.json").write_text(json.dumps(result))
        return
    if work.exists():
        import shutil
        shutil.rmtree(work)
    work.mkdir(parents=True)
    prepare(work, opts.model)
    for checkpointing in (False, True):  # TRL's KTOConfig defaults to True, train.py to False: compare like with like
        compare(work, opts.rounds, opts.steps, checkpointing)


if __name__ == "__main__":
    main()
