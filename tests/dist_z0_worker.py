"""torchrun worker for tests/test_loss.py::test_estimate_z0_torchrun_two_ranks_unequal_counts.

Run: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_z0_worker.py
Each rank holds a different number of KL log-ratios (0 on one rank in the first case); estimate_z0 must
return the mean over ALL items of ALL ranks on every rank. Each rank regenerates every rank's items from
fixed seeds, so it knows the global mean without any communication beyond the one under test. A failed
check raises, so torchrun exits non-zero; each passed check prints "z0 OK".
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stepkto_loss import estimate_z0  # noqa: E402

# case name -> (items on rank 0, items on rank 1, shift of the values)
CASES = {
    "rank0_empty": (0, 5, 0.8),
    "unequal": (3, 11, 0.5),
    "negative_mean_clamps_to_zero": (7, 2, -2.0),
}


def rank_items(case_index, rank, count, shift):
    """The KL log-ratios of one rank: deterministic, so every rank can rebuild all of them."""
    generator = torch.Generator().manual_seed(1000 * case_index + rank)
    return torch.randn(count, generator=generator, dtype=torch.float64) + shift * (1 + rank)


def check_case(case_index, name, counts, shift, rank):
    all_items = [rank_items(case_index, r, n, shift) for r, n in enumerate(counts)]
    global_mean = torch.cat(all_items).mean().item()
    z0 = estimate_z0(all_items[rank]).item()
    assert z0 == abs(z0) and abs(z0 - max(global_mean, 0.0)) < 1e-12, (name, rank, z0, global_mean)
    if global_mean > 0 and all(counts):
        # The case can tell the right answer from a mean of per-rank means (TRL's reduction). With an
        # empty rank, that rank's own (unreduced) answer would be 0, which the check above rejects.
        local_means = [items.mean().item() for items in all_items]
        assert abs(sum(local_means) / len(local_means) - global_mean) > 1e-3, name
    print(f"rank {rank} case {name}: z0 OK ({z0:.6f} == global mean {global_mean:.6f})", flush=True)


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == 2, "run with --nproc_per_node=2"
    for case_index, (name, (*counts, shift)) in enumerate(CASES.items()):
        check_case(case_index, name, counts, shift, rank)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
