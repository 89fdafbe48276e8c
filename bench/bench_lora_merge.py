"""How much of a LoRA update survives being merged into a bfloat16 base model, against a float32 merge.

    .venv/bin/python bench/bench_lora_merge.py --model models/SmolLM2-135M-Instruct --steps 25 --lr 1e-5

Trains LoRA adapters (rank 16, every linear layer) on the bfloat16 base with train.py itself (--objective sft on
built-in task solutions in the chat template, --steps AdamW steps of 16 rows, --lr), then, for every adapted weight
W (bf16) with update D = alpha / r * B A (float32):
  * bf16 merge: round_bf16(W + D), what peft's merge_and_unload gives on a bf16 model;
  * float32 merge: W + D in float32 (what train.py writes).
Reports the share of D's norm that the bf16 merge keeps (||round_bf16(W + D) - W|| / ||D||, and the part of it
along D), and the share of W's entries the bf16 merge changes at all. A merged M_i is the next iteration's policy
and reference (paper Sec. 2.4), so what the merge drops is never trained on.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from stepkto import arith_task, jsonl, models


def train_adapters(model: str, steps: int, lr: float, work: Path) -> Path:
    """train.py --lora_r 16 on the bf16 base: OUT/adapter holds the trained adapters."""
    rows = arith_task.make_split("train", 16 * steps, seed=0)
    sft = [{"id": r["id"], "problem": r["problem"], "completion": r["solution"]} for r in rows]
    jsonl.write_jsonl_atomic(work / "sft.jsonl", sft)
    out = work / "M1"
    subprocess.run([sys.executable, str(REPO / "train.py"), "--objective", "sft", "--model", model, "--data",
                    str(work / "sft.jsonl"), "--output_dir", str(out), "--dtype", "bfloat16", "--lora_r", "16",
                    "--lr", str(lr), "--max_steps", str(steps), "--per_device_batch_size", "16",
                    "--optim", "adamw_fused", "--warmup_ratio", "0", "--lr_schedule", "cosine"], check=True, cwd=REPO)
    return out / "adapter"


def survival(model: str, adapter: Path, alpha_over_r: float) -> dict:
    """The merge's effect on every adapted weight, summed over them."""
    base = models.load_model(model, "bfloat16").state_dict()
    weights = load_file(adapter / "adapter_model.safetensors")
    kept = along = total = changed = entries = 0.0
    for name, a in weights.items():
        if "lora_A" not in name:
            continue
        b = weights[name.replace("lora_A", "lora_B")]
        key = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        w = base[key].float()  # the bf16 base, exactly
        update = alpha_over_r * (b.float() @ a.float())  # (out, in): D
        delta = (w + update).to(torch.bfloat16).float() - w  # what the bf16 merge keeps of D
        total += (update**2).sum().item()
        kept += (delta**2).sum().item()
        along += (delta * update).sum().item()
        changed += (delta != 0).sum().item()
        entries += w.numel()
    return {"kept_norm": (kept / total) ** 0.5, "kept_along": along / total, "changed_entries": changed / entries,
            "update_norm": total**0.5}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = train_adapters(str(Path(args.model).resolve()), args.steps, args.lr, Path(tmp))
        result = survival(args.model, adapter, alpha_over_r=16.0 / 16)  # train.py's --lora_alpha 16, --lora_r 16
    print(f"LoRA r 16 after {args.steps} AdamW steps at lr {args.lr:g} on the bf16 base: update norm "
          f"{result['update_norm']:.4g}")
    print(f"  bf16 merge keeps {100 * result['kept_norm']:.1f}% of the update's norm "
          f"({100 * result['kept_along']:.1f}% along it) and changes {100 * result['changed_entries']:.2f}% of the "
          f"adapted weights' entries; a float32 merge keeps 100%")


if __name__ == "__main__":
    main()
