"""train.py's training throughput as model FLOP/s against this machine's measured matmul peak (MFU).

    # CPU, the 10-20M model, 2 threads, float32 (bench/BENCHMARKS.md "CPU efficiency"):
    .venv/bin/python bench/bench_train_efficiency.py --device cpu
    # GPU, a ~0.5B random-init Llama in mixed precision (float32 weights, bf16 compute: FSDP2's MixedPrecisionPolicy), FSDP2 on one GPU (torchrun, 1 process), with and without
    # activation checkpointing (bench/BENCHMARKS.md "GPU"):
    python3 bench/bench_train_efficiency.py --device cuda

Every configuration runs train.main itself (the product, through its own entry) in its own process on the same
saved random-init model and the same labelled data (long arith_task solutions with flawed steps, so that
kto and step-kto have both labels), with one train_log.jsonl line per step (--log_every 1). The timed region is
the steps after `--warmup`: each line's throughput window is one step, from the previous line to the end of its
update (the reference pass and the loading come before the first line), so its seconds are its rows /
samples_per_s and its real tokens tokens_per_s times that. Model FLOPs (activation-checkpointing recompute not
counted) come from the batch plan train.py builds from the same arguments (train.prepare_data):
    trained batch: 6 * P * T + 6 * L * H * sum_b s_b^2 / 2 * 2 + 6 * H * V * N
    KL batch (no grad, kto and step-kto): 2 * P * T + 2 * L * H * sum_b s_b^2 + 2 * H * V * N
with P the parameters of the decoder layers, T the real tokens, s_b each row's length (causal attention:
QK^T and AV each cost 2 * s^2 * H / 2 forward), N the completion tokens whose log-prob the head computes,
V the vocabulary. MFU = model FLOP/s / peak, the peak being a square matmul of the compute dtype measured
in the same process group (torch.mm, `--peak_size`), and, on a GPU, also the card's datasheet number. The peak
GPU memory is the whole run's (the reference pass, without gradients, stays below the training steps').
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SETTINGS = {  # model, data and batch per device
    "cpu": dict(hidden_size=384, num_layers=6, intermediate_size=1536, dtype="float32", mixed_precision="none", batch=8,
                steps=12,
                min_ops=4, max_ops=8, threads=2),
    "cuda": dict(hidden_size=1024, num_layers=24, intermediate_size=4096, dtype="float32", mixed_precision="bfloat16",
                 batch=32, steps=25,
                 min_ops=24, max_ops=40, threads=0),
}
DATASHEET_BF16 = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H200": 989e12}  # dense, no sparsity


def measure_matmul_peak(device: str, dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of a square matmul: the best this process gets from the BLAS at this dtype and thread count."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def write_data(path: Path, rows: int, min_ops: int, max_ops: int) -> None:
    """Flawed arith_task solutions labelled by the exact checker: label.py's fields, both labels present."""
    import random

    from stepkto import arith_task
    from stepkto import jsonl, prompting

    rng, rates, out = random.Random(0), arith_task.FlawRates(p_slip_hard=0.3), []
    for i, row in enumerate(arith_task.make_split("train", rows, 0, min_ops, max_ops, 99, "tree")):
        completion, *_ = arith_task.write_solution(rng, row["problem"], rates)
        steps = prompting.step_texts(completion, prompting.step_spans(completion))
        labels = arith_task.check_steps(row["problem"], steps)
        out.append({"id": str(i), "problem": row["problem"], "prompt": f"Problem: {row['problem']}\nSolution:\n",
                    "completion": completion,
                    "finish_reason": "stop", "outcome": completion.endswith(f"\\boxed{{{row['answer']}}}."),
                    "completions": steps, "labels": labels})
    jsonl.write_jsonl_atomic(path, out)


def write_model(path: Path, setting: dict) -> None:
    import torch

    from stepkto import models

    tokenizer = models.make_char_tokenizer()
    sizes = {k: setting[k] for k in ("hidden_size", "num_layers", "intermediate_size")}
    lm = models.make_tiny_llama(tokenizer, **sizes, max_len=4096, seed=0).to(getattr(torch, setting["dtype"]))
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)


def rows_flops(rows, params: int, hidden: int, layers: int, vocab: int, trained: bool) -> float:
    """Model FLOPs of one forward (and backward when trained) over tokenized rows (scoring.Tokenized)."""
    lengths = [row.length() for row in rows]
    factor = 3 if trained else 1  # backward = 2 x forward
    dense = 2 * params * sum(lengths)
    attention = 2 * layers * hidden * sum(n * n for n in lengths)  # causal QK^T + AV
    head = 2 * hidden * vocab * sum(len(row.completion_ids) for row in rows)
    return factor * (dense + attention + head)


def plan_flops(targs) -> tuple[list[float], int]:
    """(model FLOPs of every step of the run, the decoder layers' parameters), from the batch plan train.py builds
    from the same arguments in one process."""
    import torch

    from stepkto import models
    import train

    tokenizer = models.tokenizer_for(targs.model, targs.scratch_tokenizer)
    data = train.prepare_data(targs, train.Env(0, 1, torch.device("cpu")), tokenizer)
    lm = models.load_model(targs.model, targs.dtype, meta=True)
    layers = lm.get_decoder().layers
    shape = dict(params=sum(p.numel() for p in layers.parameters()), hidden=lm.config.hidden_size, layers=len(layers),
                 vocab=lm.config.vocab_size)
    flops = []
    for step, batch in enumerate(data.plan):
        kl = train.kl_pairs(batch.rows, range(len(batch.rows)), data.examples, keep_steps=False)
        trained = [data.examples[i].tokens for i in batch.rows]
        flops.append(rows_flops(trained, **shape, trained=True) + rows_flops(kl, **shape, trained=False))
    return flops, shape["params"]


def worker(args) -> None:
    """One train.main run; writes {tokens/s, FLOP/s, peak memory} of the timed steps to args.result."""
    import torch

    from stepkto import jsonl
    import train

    targs = train.Args(objective=args.objective, model=args.model, data=args.data, output_dir=args.output_dir,
                       per_device_batch_size=args.batch, max_steps=args.steps, lr=1e-6, dtype=args.dtype,
                       mixed_precision=args.mixed_precision, gradient_checkpointing=args.checkpointing, log_every=1,
                       save_every=0, num_threads=args.threads, seed=0,
                       **({"prompt_style": "minimal"} if args.objective == "sft" else {}))
    train.main(targs)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    log = [json.loads(line) for line in jsonl.jsonl_lines((Path(args.output_dir) / "train_log.jsonl").read_text())]
    timed = log[args.warmup :]
    seconds = [args.batch / entry["samples_per_s"] for entry in timed]  # one process: the step's rows
    flops, params = plan_flops(targs)
    result = {"steps": len(timed), "seconds": sum(seconds),
              "tokens_per_s": sum(e["tokens_per_s"] * s for e, s in zip(timed, seconds)) / sum(seconds),
              "flop_per_s": sum(flops[args.warmup :]) / sum(seconds), "decoder_params": params,
              "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
    Path(args.result).write_text(json.dumps(result))


def run_config(work: Path, setting: dict, device: str, objective: str, checkpointing: bool, warmup: int) -> dict:
    name = f"{objective}{'_ckpt' if checkpointing else ''}"
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node=1"] if device == "cuda" else [])
    command = launcher + [__file__, "--worker", "--objective", objective, "--model", str(work / "model"),
                          "--data", str(work / "data.jsonl"), "--output_dir", str(work / name),
                          "--batch", str(setting["batch"]), "--steps", str(setting["steps"]),
                          "--dtype", setting["dtype"], "--mixed_precision", setting["mixed_precision"],
                          "--threads", str(setting["threads"]),
                          "--warmup", str(warmup), "--result", str(work / f"{name}.json")]
    command += ["--checkpointing"] if checkpointing else []
    subprocess.run(command, check=True, env=os.environ | {"OMP_NUM_THREADS": str(setting["threads"] or 1)})
    return json.loads((work / f"{name}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--work", default="/tmp/bench_train_efficiency")
    parser.add_argument("--peak_size", type=int, default=0, help="matmul size for the peak (0: 1024 CPU, 8192 GPU)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing (>= 1)")
    parser.add_argument("--worker", action="store_true")
    for name in ("objective", "model", "data", "output_dir", "dtype", "mixed_precision", "result"):
        parser.add_argument(f"--{name}")
    for name in ("batch", "steps", "threads"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated runs to do (e.g. sft,kto); default all")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    import torch

    setting, work = SETTINGS[args.device], Path(args.work)
    if setting["threads"]:
        torch.set_num_threads(setting["threads"])
    work.mkdir(parents=True, exist_ok=True)
    for sub in work.iterdir():  # a fresh run: train.py refuses to overwrite its outputs
        if sub.is_dir() and sub.name != "model":
            subprocess.run(["rm", "-rf", str(sub)], check=True)
    write_data(work / "data.jsonl", setting["batch"] * setting["steps"], setting["min_ops"], setting["max_ops"])
    if not (work / "model" / "config.json").exists():
        write_model(work / "model", setting)
    dtype = getattr(torch, setting["dtype"] if setting["mixed_precision"] == "none" else setting["mixed_precision"])  # compute
    peak = measure_matmul_peak(args.device, dtype, args.peak_size or (8192 if args.device == "cuda" else 1024))
    configs = [("sft", False), ("kto", False), ("step-kto", False), ("kto", True)]
    if args.device == "cuda":
        configs += [("step-kto", True)]
    names = {f"{o}{'_ckpt' if c else ''}": (o, c) for o, c in configs}
    names = {k: v for k, v in names.items() if not args.only or k in args.only.split(",")}
    results = {k: run_config(work, setting, args.device, o, c, args.warmup) for k, (o, c) in names.items()}
    report(args, setting, peak, results)


def report(args, setting: dict, peak: float, results: dict) -> None:
    import platform

    import torch

    card = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in card), None) if args.device == "cuda" else None
    first = next(iter(results.values()))
    print(f"\nmachine: {card}, torch {torch.__version__}, {setting['dtype']} (mixed precision {setting['mixed_precision']}), threads {setting['threads'] or 'default'}; "
          f"decoder parameters {first['decoder_params'] / 1e6:.1f}M (hidden {setting['hidden_size']}, "
          f"{setting['num_layers']} layers, MLP {setting['intermediate_size']}), batch {setting['batch']}/device, "
          f"{setting['steps']} steps ({args.warmup} untimed)")
    print(f"measured matmul peak ({args.peak_size or (8192 if args.device == 'cuda' else 1024)}^3): {peak / 1e12:.2f} TFLOP/s"
          + (f"; datasheet dense bf16 {sheet / 1e12:.0f} TFLOP/s" if sheet else ""))
    head = "| run | tokens/s | model TFLOP/s | MFU vs measured peak |" + (" MFU vs datasheet |" if sheet else "")
    print(head + " peak GPU memory GiB | s/step |" if args.device == "cuda" else head + " s/step |")
    print("|" + " --- |" * (head.count("|") - 1 + (1 if args.device == "cuda" else 0) + 1))
    for name, r in results.items():
        cells = [name, f"{r['tokens_per_s']:.0f}", f"{r['flop_per_s'] / 1e12:.3f}", f"{r['flop_per_s'] / peak:.1%}"]
        cells += [f"{r['flop_per_s'] / sheet:.1%}"] if sheet else []
        cells += [f"{r['peak_gpu_memory_gib']:.1f}"] if args.device == "cuda" else []
        cells += [f"{r['seconds'] / r['steps']:.3f}"]
        print("| " + " | ".join(cells) + " |")
    if "kto" in results and "step-kto" in results:
        kto, step = results["kto"], results["step-kto"]
        print(f"step-kto / kto time per step: {(step['seconds'] / step['steps']) / (kto['seconds'] / kto['steps']):.3f}")


if __name__ == "__main__":
    main()
