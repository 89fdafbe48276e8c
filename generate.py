"""Sample step-by-step solutions from a model: N samples per problem, written as JSONL.

The sampling stage of the Step-KTO loop (paper Sections 2.1 and 2.4: the current policy M(i-1) samples solutions that
are then labelled at the step and outcome level). One output row per sample (the fields of jsonl.SAMPLE_ROW):

    {"id": "<problem id>#<k>", "problem_id", "problem", "answer", "solution"?, "prompt",
     "completion", "finish_reason": "stop"|"length", "sample_index": k, "gen": {sampling settings},
     "prompt_ids", "completion_ids", "completion_offsets"}

``prompt_ids`` / ``completion_ids`` are the token ids exactly as the engine consumed and sampled them (the stop token
included when finish_reason is "stop"): train.py scores these ids, never a re-tokenization of the text, which with a
BPE tokenizer can differ exactly at step boundaries ("\n\n" sampled as one token re-encodes as two). ``completion`` is
decoded from the ids; ``completion_offsets[i]`` is the character of ``completion`` where token i starts
(token_offsets), which is how train.py maps steps onto tokens.

Other stages call ``generate_rows(problems, output, Settings(...))`` (evaluate.py does), never ``main``.

Usage (one process; a model over several GPUs with --tensor_parallel_size; data-parallel over processes with
--num_shards, one per TP GPUs, the last to finish merging the output):

    python generate.py --model runs/stepkto/M0 --problems runs/stepkto/data/train.jsonl \
        --output runs/stepkto/iter1/samples.jsonl --num_samples 4 --temperature 1.0
    for k in 0 1 2 3 4 5 6 7; do
        CUDA_VISIBLE_DEVICES=$k python generate.py --model meta-llama/Llama-3.1-8B-Instruct --problems math_train \
            --engine vllm --output samples.jsonl --num_samples 8 --temperature 0.7 --num_shards 8 --shard_index $k &
    done; wait

Crash safety and shards: stepkto/sharding.py (OUTPUT.partial a chunk at a time, each chunk seeded from (seed, chunk
index), so a resumed or sharded output equals an uninterrupted run's); OUTPUT.provenance.json records what made it,
and a rerun that would make something else stops or, with --on_change redo, samples again (stepkto/provenance.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from stepkto import cli, engines, grading, jsonl, options, prompting, provenance, sharding
from stepkto.cli import option


@dataclass(frozen=True, kw_only=True)
class Policy(engines.EngineSettings):
    """The model that samples and how it runs: the options generate.py and evaluate.py share."""

    model: str = option(help="Model folder or hub id to sample from.")
    max_new_tokens: int = option(1024, help="Maximum tokens generated per sample.")
    seed: int = option(0, help="Random seed; each chunk is seeded from (seed, chunk index).")
    prompt_style: prompting.PromptStyle = option("instruct", help=(
        "Prompt template in prompting.PROMPT_TEMPLATES: instruct | minimal | qwen25-math-cot."))
    chunk_size: int = option(256, help=(
        "Problems per chunk: the unit of batching, seeding, resuming and sharding (with --num_shards, at least one "
        "chunk per shard). With transformers on a CPU smaller is faster: a batch runs until its longest sample ends."))


@dataclass(frozen=True, kw_only=True)
class Settings(Policy):
    """How to sample: every option of generate.py but its files. evaluate.py passes one to generate_rows."""

    num_samples: int = option(4, help="Samples per problem.")
    temperature: float = option(1.0, help="Sampling temperature; 0 means greedy decoding.")
    top_p: ClassVar[float] = 1.0  # no nucleus cut, as the paper and the Qwen2.5-Math harness sample


@dataclass(frozen=True, kw_only=True)
class Args(sharding.ShardArgs, Settings):
    """generate.py's command line: Settings, plus the files and the process."""

    problems: str = option(help="Problems: a JSONL path (problem, answer fields) or "
                           "math500|amc23|aime24|gsm8k|gsm8k_train|math_train|numina_cot.")
    output: str = option(help="Output JSONL path (written as OUTPUT.partial until complete).")
    max_problems: int = option(0, help="Use only the first N problems (0 = all).")
    num_threads: int = option(0, help="torch CPU threads (0 = torch's default).")
    on_change: provenance.OnChange = option("stop", help=provenance.ON_CHANGE_HELP)


def load_problems(spec: str, max_problems: int) -> list[dict]:
    return grading.load_benchmark(spec)[: max_problems or None]


def sample_ids(problems: list[dict], n: int) -> list[str]:
    return [f"{p['id']}#{k}" for p in problems for k in range(n)]


def token_offsets(tokenizer, ids: list[int], text: str) -> list[int]:
    """Character offset in ``text`` where each token starts, i.e. len(decode(ids[:i])), in linear time: decoded over
    a window of a few tokens as vLLM's detokenizer does, text is emitted once it no longer ends inside a multi-byte
    character (a token that begins inside one starts after the last whole character before it). Where the text so
    built is not ``text`` (pieces that do not decode as the whole), exact_token_offsets decides."""
    decode = lambda part: tokenizer.decode(part, skip_special_tokens=True)  # noqa: E731
    starts, pieces, emitted, prefix, read = [], [], 0, 0, 0
    for i in range(len(ids)):
        before = decode(ids[prefix:read])
        pending = decode(ids[prefix:i]).rstrip("\ufffd")  # tokens read..i-1, not emitted yet
        starts.append(emitted + max(0, len(pending) - len(before)))
        after = decode(ids[prefix : i + 1])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            pieces.append(after[len(before) :])
            emitted += len(pieces[-1])
            prefix, read = read, i + 1
    return starts if "".join(pieces) == text else exact_token_offsets(tokenizer, ids, text)


def exact_token_offsets(tokenizer, ids: list[int], text: str) -> list[int]:
    """len(decode(ids[:i])) for every i; where a decoded prefix is not a prefix of ``text`` (a token cut
    inside a multi-byte character), the length of what the two share."""
    prefixes = tokenizer.batch_decode([ids[:i] for i in range(len(ids))], skip_special_tokens=True)
    return [len(p) if text.startswith(p) else len(os.path.commonprefix([p, text])) for p in prefixes]


def generation_record(settings: Settings, key: engines.EngineKey) -> dict:
    """The rows' "gen" field: the settings that decide what was sampled, the engine and dtype resolved."""
    keys = ("model", "temperature", "top_p", "max_new_tokens", "seed", "num_samples", "prompt_style")
    return {**{name: getattr(settings, name) for name in keys}, "engine": key.engine, "dtype": key.dtype}


def generation_provenance(problems: list[dict], source: str, settings: Settings, key: engines.EngineKey) -> dict:
    """The output's provenance record: the problems' content, the model, and what decides the samples (the "gen"
    settings and the chunks, each seeded from its index)."""
    gen = {k: v for k, v in generation_record(settings, key).items() if k != "model"}
    return provenance.make_record("generate.py", {"problems": provenance.rows_input(problems, source)},
                                  {"model": provenance.model_identity(settings.model)},
                                  {**gen, "chunk_size": settings.chunk_size})


def generate_rows(problems: list[dict], output: str, settings: Settings, shard: sharding.Shard = sharding.Shard(),
                  desc: str = "generate", source: str = "", on_change: str = "stop") -> bool:
    """Sample this shard's chunks of the problems (read from ``source``) into ``output`` (SAMPLE_ROW rows), resuming
    after the chunks a killed run of the same provenance finished. True when ``output`` is complete
    (sharding.write_chunks: the last shard merges)."""
    chunks = sharding.chunked(problems, settings.chunk_size)
    key = engines.engine_key(settings.model, settings)
    gen, sampling = generation_record(settings, key), engines.Sampling(
        settings.num_samples, settings.temperature, settings.top_p, settings.max_new_tokens)
    if provenance.settle_jsonl(output, generation_provenance(problems, source, settings, key), on_change):
        return True

    def rows_of_chunk(index: int) -> list[dict]:
        engine = engines.get_engine(settings.model, settings)  # at the first chunk: a finished shard loads none
        prompts = [prompting.build_prompt(engine.tokenizer, p["problem"], settings.prompt_style) for p in chunks[index]]
        samples = engine.generate(prompts, sampling, sharding.derived_seed(settings.seed, index))
        return [{"id": f"{problem['id']}#{k}", "problem_id": problem["id"], "problem": problem["problem"],
                 **{name: problem[name] for name in ("answer", "solution") if name in problem},
                 "prompt": prompt, "completion": sample.text, "finish_reason": sample.finish_reason, "sample_index": k,
                 "gen": gen, "prompt_ids": sample.prompt_ids, "completion_ids": sample.completion_ids,
                 "completion_offsets": token_offsets(engine.tokenizer, sample.completion_ids, sample.text)}
                for problem, prompt, outs in zip(chunks[index], prompts, samples) for k, sample in enumerate(outs)]

    ids = [sample_ids(c, settings.num_samples) for c in chunks]
    return sharding.write_chunks(output, ids, rows_of_chunk, jsonl.SAMPLE_ROW, shard, desc)


def main(args: Args) -> None:
    options.refuse_inapplicable("generate.py", args, engine=lambda: engines.resolve_engine(args.engine))
    cli.set_num_threads(args.num_threads)
    problems = load_problems(args.problems, args.max_problems)
    shard = args.shard()
    if generate_rows(problems, args.output, args, shard, source=args.problems, on_change=args.on_change):
        print(f"{args.output} holds {len(problems) * args.num_samples} samples")
    else:
        print(f"shard {shard.index} of {shard.count} done: the last shard to finish writes {args.output}")


if __name__ == "__main__":
    cli.run_cli(Args, main)
