"""Benchmark: step rewards in one pass (stepkto_loss.step_rewards) vs one forward per prefix.

A real tiny LlamaForCausalLM samples a batch of completions of S steps (a fixed number of tokens per step);
the step rewards r_k = log pi(s_k | x, s_<k) - log pi_ref(s_k | x, s_<k) of every step are computed
  (a) in one pass: one policy and one reference forward over the full sequences, then one scatter_add;
  (b) naively: for each k, one policy and one reference forward over the prefix through step k.
Both give the same numbers (the max difference is printed); the table reports the CPU time of each (the
fastest of interleaved runs) and their ratio. CPU time of one torch thread, not wall time, because the
machine is shared: other processes stretch wall time but not the CPU seconds this process uses.
Inference mode, float32. This is a benchmark, not a test.

Run: .venv/bin/python bench/bench_step_rewards.py          (writes bench/notes/bench_loss.md)
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from stepkto_loss import step_rewards  # noqa: E402

COMMAND = ".venv/bin/python bench/bench_step_rewards.py"
EXPLANATION = """\
ratio = (one forward per prefix) / (one pass), both computing the same (B, S) step rewards (max abs diff
column). tokens ratio = tokens the per-prefix method pushes through the models / tokens of one pass
= sum_k (P + k L) / (P + S L): the ratio to expect when a forward's cost is proportional to its tokens.
It is below S because the early prefixes are short; it tends to S when the prompt dominates (P >> S L)
or when a per-call overhead dominates (very small models). The one-pass method computes each token's
log-prob once, whatever S is: its cost does not grow with the number of steps."""


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16], help="S values to measure")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--step-tokens", type=int, default=16, help="tokens per step")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per method (fastest reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = work done)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "notes" / "bench_loss.md")
    return parser.parse_args()


def tiny_llama(seed):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
    )
    return LlamaForCausalLM(config).eval()


def sample_completions(model, batch_size, prompt_tokens, completion_tokens, seed):
    """(B, P + C) prompts of random tokens followed by completions the model samples itself."""
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (batch_size, prompt_tokens), generator=generator)
    torch.manual_seed(seed)
    return model.generate(
        prompts, attention_mask=torch.ones_like(prompts), do_sample=True, max_new_tokens=completion_tokens,
        min_new_tokens=completion_tokens, eos_token_id=None, pad_token_id=0,
    )


def token_logps(model, input_ids):
    """(B, T-1): log p(input_ids[:, j+1] | input_ids[:, :j+1])."""
    logits = model(input_ids=input_ids).logits[:, :-1]  # (B, T-1, V)
    return logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def one_pass_rewards(policy, reference, input_ids, step_ids, num_steps):
    """(B, S): two forwards over the full sequences, one scatter_add."""
    return step_rewards(token_logps(policy, input_ids), token_logps(reference, input_ids), step_ids, num_steps)


def per_prefix_rewards(policy, reference, input_ids, prompt_tokens, step_tokens, num_steps):
    """(B, S): for each step, two forwards over the prefix through that step; sum the step's tokens."""
    rewards = []
    for k in range(num_steps):
        prefix = input_ids[:, : prompt_tokens + (k + 1) * step_tokens]  # (B, P + (k+1) L)
        logratios = token_logps(policy, prefix) - token_logps(reference, prefix)  # (B, P + (k+1) L - 1)
        rewards.append(logratios[:, -step_tokens:].sum(dim=1))
    return torch.stack(rewards, dim=1)


def best_cpu_seconds(functions, repeats):
    """Fastest process CPU time of each function over interleaved runs (the least disturbed run, as timeit
    advises; interleaving makes load changes hit both methods alike)."""
    for function in functions:
        function()  # warm-up: allocator, kernels
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, function_times in zip(functions, times):
            start = time.process_time()
            function()
            function_times.append(time.process_time() - start)
    return [min(function_times) for function_times in times]


def measure(policy, reference, args, num_steps):
    """One table row: median seconds of both methods, their ratio, the max difference of the rewards."""
    completion_tokens = num_steps * args.step_tokens
    input_ids = sample_completions(policy, args.batch_size, args.prompt_tokens, completion_tokens, seed=num_steps)
    # Position j scores token j+1: prompt tokens are -1, completion token i belongs to step i // L.
    completion_steps = torch.arange(num_steps * args.step_tokens) // args.step_tokens
    step_ids = torch.cat([torch.full((args.prompt_tokens,), -1), completion_steps])[1:].expand(args.batch_size, -1)
    one_pass = lambda: one_pass_rewards(policy, reference, input_ids, step_ids, num_steps)  # noqa: E731
    per_prefix = lambda: per_prefix_rewards(  # noqa: E731
        policy, reference, input_ids, args.prompt_tokens, args.step_tokens, num_steps
    )
    with torch.inference_mode():
        max_diff = (one_pass() - per_prefix()).abs().max().item()
        one_pass_s, per_prefix_s = best_cpu_seconds([one_pass, per_prefix], args.repeats)
    # Tokens the naive method pushes through the model, relative to one pass: its ratio if compute-bound.
    token_ratio = sum(args.prompt_tokens + (k + 1) * args.step_tokens for k in range(num_steps)) / input_ids.size(1)
    return dict(S=num_steps, one_pass_s=one_pass_s, per_prefix_s=per_prefix_s, ratio=per_prefix_s / one_pass_s,
                token_ratio=token_ratio, max_diff=max_diff)


def machine_description():
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
    threads = torch.get_num_threads()
    return f"{cpu}, os.cpu_count()={os.cpu_count()}, {threads} torch thread(s), torch {torch.__version__}, CPU only"


def markdown_table(rows):
    lines = ["| S | one pass (CPU s) | one forward per prefix (CPU s) | ratio | 0.8*S | tokens ratio | max abs diff |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['S']} | {r['one_pass_s']:.4f} | {r['per_prefix_s']:.4f} | {r['ratio']:.2f} | "
                     f"{0.8 * r['S']:.1f} | {r['token_ratio']:.2f} | {r['max_diff']:.1e} |")
    return "\n".join(lines)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    policy = tiny_llama(seed=0)
    reference = tiny_llama(seed=1)
    rows = [measure(policy, reference, args, num_steps) for num_steps in args.steps]
    table = markdown_table(rows)
    print(table)
    met = [r["S"] for r in rows if r["ratio"] >= 0.8 * r["S"]]
    missed = [r["S"] for r in rows if r["ratio"] < 0.8 * r["S"]]
    verdict = (f"Measured ratio >= 0.8*S for S in {met}, below it for S in {missed}; the measured ratio follows "
               "the tokens ratio, i.e. the forwards here are compute-bound.")
    setup = (f"batch {args.batch_size}, prompt {args.prompt_tokens} tokens, {args.step_tokens} tokens per step "
             f"(completion = S x {args.step_tokens} tokens, sampled by the model), LlamaForCausalLM hidden 256, "
             f"4 layers, vocab 2048, float32, inference mode, process CPU time, fastest of {args.repeats} "
             "interleaved runs after one warm-up")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = f"{machine_description()}; load average at the end {load} (1/5/15 min; the machine is shared)"
    section = (f"## Step rewards: one pass vs one forward per prefix\n\nCommand: `{COMMAND}`\n\n"
               f"Machine: {machine}\n\nSetup: {setup}.\n\n{table}\n\n{verdict}\n\n{EXPLANATION}\n")
    args.output.write_text(section)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
