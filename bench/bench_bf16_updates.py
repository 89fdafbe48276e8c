"""How many weights one AdamW step changes: bf16 weights against float32 weights under bf16 autocast (train.py
--dtype bfloat16, refused for weights trained in place, against --dtype float32 --autocast bfloat16).

    .venv/bin/python bench/bench_bf16_updates.py --model models/SmolLM2-135M-Instruct --lrs 5e-7 1e-6 1e-5 1e-4

bf16 keeps 8 bits of mantissa, so an update smaller than about 1/256 of a weight rounds away. AdamW's first
step moves every weight with a gradient by about lr (its update is normalized), so with weights of ~1e-2 a
learning rate of 5e-7 (the README's full fine-tuning command for an 8B model) is ~150x under the resolution.
For each learning rate: the model in bf16 and in float32, one AdamW step (weight decay 0) on the same batch
of random tokens, the loss under bf16 autocast in both, and the share of weights whose stored value changed.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stepkto import models


def share_changed(model_path: str, dtype: str, lr: float, ids: torch.Tensor) -> float:
    """Share of the weights that one AdamW step at this lr changes, the weights stored in dtype."""
    lm = models.load_model(model_path, dtype)
    before = [p.detach().clone() for p in lm.parameters()]
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    changed = sum((p.detach() != b).sum().item() for p, b in zip(lm.parameters(), before))
    return changed / sum(b.numel() for b in before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lrs", type=float, nargs="+", default=[5e-7, 1e-6, 1e-5, 1e-4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))  # (B, S)
    print("| lr | weights changed by one AdamW step: bf16 weights | float32 weights, bf16 autocast |\n|---|---|---|")
    for lr in args.lrs:
        bf16, mixed = (share_changed(args.model, dtype, lr, ids) for dtype in ("bfloat16", "float32"))
        print(f"| {lr:g} | {100 * bf16:.2f}% | {100 * mixed:.2f}% |")


if __name__ == "__main__":
    main()
