"""train.py --objective kto vs TRL's KTOTrainer on the same work: samples/s, peak RSS, losses.

    # the 14.2M random-init Llama (bench/BENCHMARKS.md section 6) and the embedded default's tiny task model:
    .venv/bin/python bench/bench_train_vs_trl.py [--rounds 2] [--model 14m|task]
    # SmolLM2-135M-Instruct, a real save_pretrained folder (64 rows, batch 8, 8 steps, 2 threads, float32,
    # without and with activation checkpointing):
    .venv/bin/python bench/bench_train_vs_trl.py --model models/SmolLM2-135M-Instruct --threads 2 --rounds 2
    # (10 trainer processes of roughly 2-3 min each on an idle 2-core CPU, an estimate from batch-2 smoke
    # runs; add --rounds 1 --checkpointing off for a quarter of that)

--model takes 14m / task (random-init Llama, char tokenizer, "minimal" prompts) or the path of a
save_pretrained folder (its own tokenizer; prompts through prompting.build_prompt(tokenizer, problem,
"instruct"), i.e. the chat template when it has one, as generate.py writes them).

Same on both sides: model and dtype (float32), KTO rows (arith_task problems, label.py's fields; half of
the solutions corrupted into wrong answers, so train.py's balanced lambdas are 1, 1 = TRL's defaults), batch
size, steps, lr, beta, linear decay without warmup, grad clip 1.0, torch threads (and OMP/MKL_NUM_THREADS),
the activation-checkpointing setting (run off and on: TRL's KTOConfig defaults to on, train.py to off),
bf16=False for TRL (its configs default to bf16 autocast), and reference log-probs precomputed once
before training on both sides (TRL: precompute_ref_log_probs=True; train.py always does, see
train.reference_logps), with the training batch size. Both sides get the same TEXT rows (no prompt_ids /
completion_ids fields), so train.py tokenizes prompt and completion itself (train.tokenized_text); the
bench checks that TRL's tokenization of every row gives the same ids. TRL gets the rows in the order of
train.py's batch plan with its sequential sampler, so both see the same batches and the same rotated KL
pairs: the two losses must agree at every step, not only the first.

Both optimizers are fused AdamW by default (TRL: TrainingArguments optim="adamw_torch_fused"; train.py:
--optim adamw_fused; `--optim adamw` gives train.py's default, which on CPU updates one tensor at a time).
Left at each side's own default (they are what each trainer does): TRL's fused LM head scores EVERY position (prompt and padding too: its compact path
is for Triton devices only) and also computes entropy and mean logits for its metrics, train.py's head
runs on the completion tokens only, in chunks of --logits_chunk_mib (default 256 MiB of float32 logits,
1,365 tokens at SmolLM2's vocabulary: with batch 8 and
~47-token completions one chunk, i.e. no chunking).

Each trainer runs in its own subprocess (peak RSS = ru_maxrss of that child from os.wait4: the whole
process, model load, reference pass, training and save), alternating ours, TRL, ours, TRL, ...
Each side through its public interface: ours is train.main with one train_log.jsonl line per step, TRL's
KTOTrainer with a TrainerCallback. Timed regions, wall time (the fastest run of each side is reported):
  * steps: the training steps after the first one, from the end of step 1 to the end of the last step
    (ours: the log lines' throughput windows, each one step from the previous line to the end of its update:
    rows / samples_per_s seconds; TRL: TrainerCallback.on_step_end);
  * loop: ours, the sum of those windows (from just before step 1); TRL, trainer.train() (this includes its
    optimizer/dataloader setup and step 1);
  * end to end: everything after the imports: ours = train.main (tokenize, plan, load, reference pass,
    training, save_pretrained); TRL = load tokenizer + model, KTOTrainer(...) (tokenize, reference pass),
    trainer.train(), trainer.save_model().
"""

import argparse
import itertools
import json
import os
import platform
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
LR, BETA = 1e-5, 0.1


def worker_ours(work: Path, cfg: dict, run: str, checkpointing: bool) -> dict:
    from stepkto import jsonl
    import train

    out = work / f"ours_{run}"
    chunk = {"logits_chunk_mib": cfg["chunk"]} if cfg["chunk"] is not None else {}  # else train.py's default
    args = train.Args(objective="kto", model=cfg["model"], data=str(work / "data.jsonl"), output_dir=str(out),
                      per_device_batch_size=cfg["batch"], max_steps=cfg["steps"], lr=LR, beta=BETA, warmup_ratio=0.0,
                      nll_weight=0.0,  # KTO's loss alone, as TRL's (train.py's NLL anchor is not KTO's)
                      log_every=1, save_every=0, num_threads=cfg["threads"], seed=0,
                      gradient_checkpointing=checkpointing, dtype="float32", optim=cfg["optim"], **chunk)
    start = time.perf_counter()
    train.main(args)
    total = time.perf_counter() - start
    log = [json.loads(line) for line in jsonl.jsonl_lines((out / "train_log.jsonl").read_text())]
    stamps = list(itertools.accumulate(cfg["batch"] / entry["samples_per_s"] for entry in log))  # each step's end
    return {"total": total, "loop": stamps[-1], "stamps": stamps, "losses": [e["loss/total"] for e in log],
            "grad_norm0": log[0]["grad_norm"], "logits_chunk_mib": args.logits_chunk_mib, "optim": args.optim}


def trl_config(work: Path, cfg: dict, run: str, checkpointing: bool):
    from trl import KTOConfig

    return KTOConfig(output_dir=str(work / f"trl_{run}"), per_device_train_batch_size=cfg["batch"],
                     max_steps=cfg["steps"], learning_rate=LR, beta=BETA, lr_scheduler_type="linear", warmup_steps=0,
                     max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
                     use_cpu=True, max_length=None, disable_tqdm=True,
                     precompute_ref_log_probs=True,  # as train.py: log pi_ref once, before training
                     train_sampling_strategy="sequential", seed=0, dataloader_num_workers=0,
                     bf16=False,  # TRL defaults to bf16 autocast; both sides compute in float32 here
                     gradient_checkpointing=checkpointing)  # TRL defaults to True; train.py to False


def same_tokens(trainer, rows: list[dict], model: str) -> bool:
    """TRL's prompt / completion ids of every row == train.py's own tokenization of the text row."""
    from stepkto import models
    import train

    tokenizer = models.tokenizer_for(model)
    for example, row in zip(trainer.train_dataset, rows):
        prompt_ids, completion_ids, _ = train.tokenized_text(tokenizer, row)
        if (example["prompt_ids"], example["completion_ids"]) != (prompt_ids, completion_ids):
            return False
    return len(trainer.train_dataset) == len(rows)


def worker_trl(work: Path, cfg: dict, run: str, checkpointing: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOTrainer

    from stepkto import jsonl

    torch.set_num_threads(cfg["threads"])
    rows = [json.loads(line) for line in jsonl.jsonl_lines((work / "data_plan_order.jsonl").read_text())]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"], "label": r["outcome"]}
                                 for r in rows])
    stamps = []

    class Stamp(TrainerCallback):  # the end of every optimizer step
        def on_step_end(self, *args, **kwargs):
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    trainer = KTOTrainer(model=model, args=trl_config(work, cfg, run, checkpointing), train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[Stamp()])
    loop = time.perf_counter()
    trainer.train()
    result = {"loop": time.perf_counter() - loop}
    trainer.save_model(str(work / f"trl_{run}" / "final"))  # as train.py's final save_pretrained
    result["total"] = time.perf_counter() - start
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return result | {"stamps": stamps, "losses": losses, "grad_norm0": trainer.state.log_history[0]["grad_norm"],
                     "same_tokens": same_tokens(trainer, rows, cfg["model"])}


def kto_rows(tokenizer, n: int, style: str) -> list[dict]:
    """label.py's KTO fields as text only (no ids): arith_task problems, every other solution made wrong."""
    from stepkto import arith_task, prompting

    problems = arith_task.make_split("train", n, seed=0, shape="chain", max_number=20, min_ops=2, max_ops=5)
    rng, rows = random.Random(0), []
    for i, p in enumerate(problems):
        good = i % 2 == 0  # half desirable: train.py's balanced lambdas are then 1, 1 (TRL's defaults)
        wrong = str(int(p["answer"]) + rng.choice([-3, -2, -1, 1, 2, 3]))
        right, wrong = f"\\boxed{{{p['answer']}}}", f"\\boxed{{{wrong}}}"
        completion = p["solution"] if good else p["solution"].replace(right, wrong)
        rows.append({"id": p["id"], "prompt": prompting.build_prompt(tokenizer, p["problem"], style),
                     "completion": completion, "finish_reason": "stop", "outcome": good})
    return rows


def load_or_make_model(work: Path, model_name: str):
    """(model folder, tokenizer, model): a built-in random-init Llama saved under work/, or --model PATH
    (built on the meta device: only its parameter count and vocabulary are needed here)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from stepkto import models

    if model_name in MODELS:
        tokenizer = models.make_char_tokenizer()
        model = models.make_tiny_llama(tokenizer, **MODELS[model_name], seed=0)
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        return str(work / "model"), tokenizer, model
    path = str(Path(model_name).resolve())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return path, models.load_tokenizer(path), model


def prepare(work: Path, opts) -> dict:
    """Model, KTO JSONL, the same rows in the order of train.py's batch plan (for TRL), the workers' config."""
    import torch

    import train

    path, tokenizer, model = load_or_make_model(work, opts.model)
    rows = kto_rows(tokenizer, opts.rows, "minimal" if opts.model in MODELS else "instruct")
    write = lambda file, rs: file.write_text("".join(json.dumps(r) + "\n" for r in rs))  # noqa: E731
    write(work / "data.jsonl", rows)
    args = train.Args(objective="kto", model=path, data=str(work / "data.jsonl"), output_dir="-",
                      per_device_batch_size=opts.batch, seed=0)
    plan = train.prepare_data(args, train.Env(0, 1, torch.device("cpu")), tokenizer).plan
    write(work / "data_plan_order.jsonl", [rows[i] for batch in plan for i in batch.rows])
    pairs = [train.tokenized_text(tokenizer, r)[:2] for r in rows]
    source = Path(path) / "source.json"  # the dequantized GGUF's provenance note, where there is one
    return {"model": path, "batch": opts.batch, "steps": opts.steps, "threads": opts.threads, "chunk": opts.chunk,
            "optim": opts.optim,
            "vocab": model.config.vocab_size, "params": sum(p.numel() for p in model.parameters()),
            "note": json.loads(source.read_text()).get("note", "") if source.exists() else "",
            "prompt_tokens": sum(len(p) for p, _ in pairs) / len(rows),
            "completion_tokens": sum(len(c) for _, c in pairs) / len(rows), "rows": len(rows), "batches": len(plan)}


def run_child(name: str, work: Path, run: str, cfg: dict, checkpointing: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--work", str(work), "--run", run]
    cmd += ["--checkpointing", "on" if checkpointing else "off"]
    threads = str(cfg["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    with open(work / f"{name}_{run}.err", "w") as err:
        child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        sys.exit(f"{name} run {run} failed, see {work / f'{name}_{run}.err'}")
    result = json.loads((work / f"{name}_{run}.json").read_text())
    if len(result["stamps"]) != cfg["steps"]:
        sys.exit(f"{name} run {run}: {len(result['stamps'])} step ends recorded, expected {cfg['steps']}")
    return {**result, "rss_mib": usage.ru_maxrss / 1024}


def speeds(run: dict, cfg: dict) -> dict:
    """samples/s of one run (wall): steps 2..N, the loop and end to end."""
    samples = (cfg["steps"] - 1) * cfg["batch"]
    all_samples = cfg["steps"] * cfg["batch"]
    return {"steps_wall": samples / (run["stamps"][-1] - run["stamps"][0]), "loop_wall": all_samples / run["loop"],
            "total_wall": all_samples / run["total"]}


def table(results: dict, cfg: dict, tag: str) -> list[str]:
    """Markdown rows of one checkpointing setting (fastest run of each side, largest RSS) and the ratios."""
    lines, best = [], {}
    for name, runs in results.items():
        per_run = [speeds(r, cfg) for r in runs]
        best[name] = {k: max(s[k] for s in per_run) for k in per_run[0]}  # fastest run: least noise
        best[name]["rss"] = max(r["rss_mib"] for r in runs)
        b, label = best[name], "train.py" if name == "ours" else "TRL KTOTrainer"
        lines.append(f"| {tag} | {label} | {b['steps_wall']:.2f} | {b['loop_wall']:.2f} | {b['total_wall']:.2f} "
                     f"| {b['rss']:.0f} |")
    ratio = {k: best["ours"][k] / best["trl"][k] for k in best["ours"]}
    lines.append(f"| {tag} | ratio ours/TRL | {ratio['steps_wall']:.2f}x | {ratio['loop_wall']:.2f}x "
                 f"| {ratio['total_wall']:.2f}x | {ratio['rss']:.2f}x |")
    return lines


def checks(results: dict, tag: str) -> list[str]:
    """Same tokens, same losses at every step, same gradient norm at step 0 (first run of each side)."""
    ours, trl = results["ours"][0], results["trl"][0]
    diffs = [abs(a - b) for a, b in zip(ours["losses"], trl["losses"])]
    # At step 0 the policy IS the reference: both losses are exactly sigmoid(0) = 0.5 whatever the pairing;
    # the gradient norm at step 0 and the later losses are the real check.
    g_ours, g_trl = ours["grad_norm0"], trl["grad_norm0"]
    return [f"- {tag}: TRL's token ids == train.py's for every row: {trl['same_tokens']}; loss at step 0: ours "
            f"{ours['losses'][0]:.6f}, TRL {trl['losses'][0]:.6f}; max |loss diff| over {len(diffs)} steps "
            f"{max(diffs):.2e} ({'OK' if max(diffs) < 1e-4 else 'MISMATCH'}); grad norm at step 0: ours "
            f"{g_ours:.6f}, TRL {g_trl:.6f} (rel diff {abs(g_ours - g_trl) / g_trl:.1e})"]


def compare(work: Path, cfg: dict, rounds: int, checkpointing: bool) -> tuple[list[str], list[str]]:
    """Ours and TRL alternating, `rounds` times each, both with or both without activation checkpointing."""
    results = {"ours": [], "trl": []}
    tag = "on" if checkpointing else "off"
    for r in range(rounds):
        for name in results:
            results[name].append(run_child(name, work, f"ckpt_{tag}{r}", cfg, checkpointing))
            res, s = results[name][-1], speeds(results[name][-1], cfg)
            print(f"checkpointing {tag}, round {r} {name}: steps 2-{cfg['steps']} {s['steps_wall']:.2f} samples/s, "
                  f"loop {res['loop']:.1f} s, end to end {res['total']:.1f} s, peak RSS {res['rss_mib']:.0f} MiB",
                  flush=True)
    cfg["logits_chunk_mib"] = results["ours"][0]["logits_chunk_mib"]
    return table(results, cfg, tag), checks(results, tag)


def header(cfg: dict, opts) -> list[str]:
    import torch
    import trl
    import transformers

    model = opts.model if opts.model in MODELS else Path(cfg["model"]).name
    return [f"# train.py vs TRL {trl.__version__} KTOTrainer: {model}\n",
            f"Command: `.venv/bin/python bench/bench_train_vs_trl.py {' '.join(sys.argv[1:])}`\n",
            f"Machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, load average {os.getloadavg()[0]:.1f} at the start.\n",
            f"Model: {model}, {cfg['params'] / 1e6:.1f}M parameters, vocabulary {cfg['vocab']:,}, float32"
            + (f" ({cfg['note']})" if cfg["note"] else "") + ".\n",
            f"Data: {cfg['rows']} KTO text rows (half desirable), {cfg['prompt_tokens']:.1f} prompt + "
            f"{cfg['completion_tokens']:.1f} completion tokens per row on average; batch {cfg['batch']}, "
            f"{cfg['steps']} steps, {cfg['threads']} torch thread(s) per process, {opts.rounds} round(s) per side.\n"]


def report(work: Path, cfg: dict, opts) -> list[str]:
    lines, notes = header(cfg, opts), []
    lines += ["| activation checkpointing | trainer | steps 2..N samples/s (wall) | train loop samples/s (wall) "
              "| end-to-end samples/s (wall) | peak RSS (MiB) |", "|---|---|---|---|---|---|"]
    settings = {"off": [False], "on": [True], "both": [False, True]}[opts.checkpointing]
    for checkpointing in settings:
        rows, checked = compare(work, cfg, opts.rounds, checkpointing)
        lines += rows
        notes += checked
    lines += ["", f"Reference log-probs: precomputed once before training on both sides (TRL "
              f"precompute_ref_log_probs=True). train.py --logits_chunk_mib {cfg['logits_chunk_mib']}, "
              f"--optim {cfg['optim']}.", ""]
    return lines + notes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="14m", help="14m | task (random-init Llama) | PATH (save_pretrained folder)")
    parser.add_argument("--rows", type=int, help="KTO rows (default: 256 for 14m/task, 64 for a PATH)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, help="default: rows // batch (one epoch)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process, both sides")
    parser.add_argument("--chunk", type=float, help="train.py --logits_chunk_mib (default: train.py's)")
    parser.add_argument("--optim", default="adamw_fused", choices=["adamw", "adamw_fused"],
                        help="train.py --optim (default adamw_fused: TRL's optim is adamw_torch_fused)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    parser.add_argument("--out", help="also write the markdown report to this file")
    parser.add_argument("--work", default="/tmp/bench_train_vs_trl")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--run", default="0", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    work = Path(opts.work)
    if opts.worker:
        worker = worker_ours if opts.worker == "ours" else worker_trl
        config = json.loads((work / "config.json").read_text())
        result = worker(work, config, opts.run, opts.checkpointing == "on")
        (work / f"{opts.worker}_{opts.run}.json").write_text(json.dumps(result))
        return
    run_bench(work, opts, parser)


def run_bench(work: Path, opts, parser) -> None:
    opts.rows = opts.rows or (256 if opts.model in MODELS else 64)
    opts.steps = opts.steps or opts.rows // opts.batch
    if opts.rows % opts.batch or not 2 <= opts.steps <= opts.rows // opts.batch:
        parser.error("need --rows a multiple of --batch and 2 <= --steps <= rows / batch")
    if work.exists():
        import shutil
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cfg = prepare(work, opts)
    (work / "config.json").write_text(json.dumps(cfg))
    lines = report(work, cfg, opts)
    print("\n" + "\n".join(lines))
    if opts.out:
        Path(opts.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
