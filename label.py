"""Label sampled solutions at two levels: the final answer (outcome) and every step (process).

Paper Section 2.1: the outcome label is a rule-based check of the final answer against the gold answer; the
step labels come from a process reward model. Step labellers (``--prm``):

* ``check``: exact, no model. On the built-in arithmetic task (stepkto/arith_task.py) every step is checked against
  the problem's expression tree (a step is wrong when its equation is false or when it starts from a value the
  previous steps did not produce); on any other text a step is wrong when an arithmetic equation it states is false.
* ``judge``: the paper's PRM as we read it (Section 2.1): an LLM (``--judge_model``, greedy) sees the problem, the
  reference solution (the row's ``solution``; the prompt says so when there is none) and the student's steps, one
  call per step or one per solution naming its first wrong step, the steps after it labelled wrong (``--judge_protocol
  first_error``, as ProcessBench asks: train with --step_scope first_error). Prompts and verdict parser:
  stepkto/judging.py. A reply without a verdict, or cut off at ``--judge_max_new_tokens``, gives the step a null
  label: no evidence either way, counted in ``prm_failures`` (cut-off replies also in ``prm_cutoffs``). With
  ``--judge_verdict logprobs`` a step's score is P(correct) / (P(correct) + P(incorrect)) at the reply's first word.
  The judge runs in this process (``--judge_engine transformers | vllm``) or on a server (``openai``: served.py).
* ``mc``: Monte-Carlo rollouts (Math-Shepherd, arXiv 2312.08935): from the prefix through step k (prompt +
  completion through step k + "\\n\\n") the policy samples ``--mc_rollouts`` continuations; step k is right when at
  least ``--mc_threshold`` of them end in the gold answer (the last \\boxed{} of prefix and continuation).
* ``reward_model``: a trained PRM (stepkto/prm_models.py), in this process or served (``--prm_base_url``).

A labeller is ``fn(rows, spans, settings, engine=None) -> [[True | False | None | CUT_OFF per step] per row]``
(None: no verdict; CUT_OFF: none, because the judge's reply was cut off), or, when it scores steps
(``step_scorer``), ``[[P(step right) | None per step] per row]``; ``spans[i]`` are row i's steps
(prompting.step_spans, split once in label_rows). ``engine`` replaces the judge's or the policy's engine (the
ProcessBench benchmark passes one that counts tokens); all prompts of a chunk go through one generation call.

Other stages call ``label_file(samples, output, Settings(...))`` (evaluate.py does) or ``label_rows``, never
``main``. Input rows carry jsonl.SAMPLE_ROW; output rows carry jsonl.LABELLED_ROW: the input rows plus

    {"completions": [step, ...], "step_spans": [[start, end] per step: characters of "completion"],
     "labels": [bool | None per step], "outcome": bool, "pred": str | None, "prm": str,
     "prm_failures": int (steps without a verdict), "prm_cutoffs": int (those whose judge reply was cut off),
     "step_scores": [float | None per step], "step_scorer": {...} (a scoring labeller's only: P(step right) per
     step and the settings that decide them; labelled again with another threshold, the scores are kept)}

where ``prompt`` / ``completions`` / ``labels`` are TRL's stepwise-supervision fields, so a file without null
labels feeds TRL's PRMTrainer as it is.

Usage:

    python label.py --input runs/stepkto/iter1/samples.jsonl --output runs/stepkto/iter1/labels.jsonl --prm check
    python label.py --input samples.jsonl --output labels.jsonl --prm judge \\
        --judge_model Qwen/Qwen2.5-72B-Instruct --judge_engine vllm --judge_tensor_parallel_size 8
    python label.py --input samples.jsonl --output labels.jsonl --prm judge --judge_model Qwen/Qwen2.5-72B-Instruct \
        --judge_engine openai --judge_base_url http://127.0.0.1:8000/v1 --judge_verdict logprobs
    python label.py --input samples.jsonl --output labels.jsonl --prm mc --mc_rollouts 8 --engine vllm

Crash safety and shards (--num_shards, --shard_index) as in generate.py: OUTPUT.partial grows a chunk at a time; a
rerun resumes. mc seeds each chunk from (--seed, the chunk's row ids), so a resumed or sharded run writes what an
uninterrupted one would have.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch

from stepkto import (arith_task, cli, engines, equations, grading, jsonl, judging, options, prm_models, prompting,
    provenance, served, sharding)
from stepkto.cli import option

# The top log-probs at every token of a judge reply (--judge_verdict logprobs): the most OpenAI's API and vLLM return.
JUDGE_TOP_LOGPROBS = 20


@dataclass(frozen=True, kw_only=True)
class Settings(engines.EngineSettings):
    """How to label: every option of label.py but its files; evaluate.py takes them as it takes generate.py's.
    The engine settings (engine, dtype, ...) are those of the mc rollouts' policy; the judge has its own."""

    prm: Literal["check", "judge", "mc", "reward_model"] = option("check", help=(
        "Step labeller: check | judge | mc | reward_model (a trained PRM: --prm_model, --prm_format)."))
    judge_model: str = option("", help="--prm judge: the judge LLM (folder or hub id).")
    judge_protocol: Literal["step", "first_error"] = option("step", help=(
        "--prm judge: step (one call per step) | first_error (one per solution naming its first wrong step)."))
    judge_max_new_tokens: int = option(512, help=(
        "--prm judge: tokens per reply (greedy); a reply cut off at this budget gives no verdict (prm_cutoffs)."))
    judge_engine: Literal["auto", "transformers", "vllm", "openai"] = option("auto", help=(
        "--prm judge: transformers | vllm | auto (in this process) | openai (a served judge at --judge_base_url)."))
    judge_base_url: str = option("", help="--judge_engine openai: the server's API root (http://127.0.0.1:8000/v1).")
    judge_api: served.Api = option("completions", help=(
        "--judge_engine openai: completions (a vLLM / SGLang server: exact prompt token ids) | chat (chat template)."))
    judge_tokenizer: str = option("", help=(
        "--judge_api completions: the judge's tokenizer, which encodes the prompts (default: --judge_model)."))
    judge_api_key_env: str = option("OPENAI_API_KEY", help=(
        "--judge_engine openai: the environment variable that holds the API key (read there, written nowhere)."))
    judge_max_concurrency: int = option(8, help="--judge_engine openai: requests in flight at once.")
    judge_verdict: Literal["text", "logprobs"] = option("text", help=(
        "--prm judge: text (parsed reply) | logprobs (P(correct) at the reply's first word, as step_scores)."))
    judge_threshold: float = option(0.5, help="--judge_verdict logprobs: a step is right when its score is >= this.")
    judge_dtype: engines.Dtype = option("auto", help="--prm judge: the judge's dtype (as --dtype).")
    judge_tensor_parallel_size: int = option(1, help="--prm judge: vLLM tensor parallel size of the judge.")
    judge_gpu_memory_utilization: float = option(0.9, help="--prm judge: vLLM's share of GPU memory for the judge.")
    judge_max_model_len: int = option(0, help="--prm judge: vLLM context length of the judge (0: the model's own).")
    allow_missing_reference: bool = option(False, help=(
        "--prm judge: label even when no row has a reference solution (field 'solution'; Section 2.1)."))
    prm_model: str = option("", help=(
        "--prm reward_model: the trained PRM, a folder or hub id (with --prm_base_url, its name on the server)."))
    prm_format: prm_models.PRMFormat = option("qwen_prm", help=(
        "--prm reward_model: qwen_prm (Qwen2.5-Math-PRM) | step_tag (Math-Shepherd: P(good) at a tag per step)."))
    prm_threshold: float = option(0.5, help="--prm reward_model: a step is right when P(step right) is >= this.")
    prm_step_tag: str = option(prm_models.STEP_TAG, help="--prm_format step_tag: the tag written after each step.")
    prm_good_token: str = option(prm_models.GOOD_TOKEN, help="--prm_format step_tag: the token of a right step.")
    prm_bad_token: str = option(prm_models.BAD_TOKEN, help="--prm_format step_tag: the token of a wrong step.")
    prm_base_url: str = option("", help=(
        "--prm reward_model: a vLLM server of the PRM (prm_models.vllm_server_args), e.g. http://127.0.0.1:8001/v1."))
    policy_model: str = option("", help=(
        "--prm mc: the policy that rolls out (default: the rows' gen.model), on --engine, --dtype, ..."))
    mc_rollouts: int = option(4, help="--prm mc: continuations sampled per step (K).")
    mc_threshold: int = option(1, help="--prm mc: a step is right when >= this many of K reach the gold answer.")
    mc_temperature: float = option(1.0, help="--prm mc: sampling temperature of the rollouts.")
    mc_max_new_tokens: int = option(1024, help="--prm mc: maximum tokens per rollout.")
    seed: int = option(0, help="--prm mc: seed; each chunk is seeded from (seed, its row ids).")


@dataclass(frozen=True, kw_only=True)
class Args(sharding.ShardArgs, Settings):
    """label.py's command line: Settings, plus the files and their chunking."""

    input: str = option(help="Samples JSONL written by generate.py.")
    output: str = option(help="Labelled JSONL (written as OUTPUT.partial until complete).")
    chunk_size: int = option(1024, help=(
        "Rows per chunk: the unit of resuming, sharding and batching (keep it small with transformers: one batch)."))
    on_change: provenance.OnChange = option("stop", help=provenance.ON_CHANGE_HELP)


def check_args(settings: Settings) -> None:
    """Fail before any work on an option combination that cannot run (main refuses those that would do nothing)."""
    cli.check_choices(settings)
    if settings.prm == "judge" and not settings.judge_model:
        raise ValueError("--prm judge needs --judge_model (a folder or hub id; a served judge's name on its server)")
    if settings.prm == "reward_model" and not settings.prm_model:
        raise ValueError("--prm reward_model needs --prm_model (a folder or hub id of the PRM)")
    if settings.judge_engine == "openai" and not settings.judge_base_url:
        raise cli.UsageError("--judge_engine openai needs --judge_base_url (e.g. http://127.0.0.1:8000/v1)")
    if settings.judge_verdict == "logprobs" and settings.judge_protocol != "step":
        raise cli.UsageError("--judge_verdict logprobs reads a one-word verdict: it needs --judge_protocol step")
    if settings.judge_engine == "openai" and settings.judge_max_concurrency < 1:
        raise cli.UsageError("need --judge_max_concurrency >= 1")
    if settings.prm == "mc" and not 1 <= settings.mc_threshold <= settings.mc_rollouts:
        raise ValueError(f"--mc_threshold {settings.mc_threshold}: must be 1..--mc_rollouts ({settings.mc_rollouts})")


def get_judge(settings: Settings) -> engines.Engine:
    """The judge's engine: the served one, or one loaded in this process (engines.get_engine: one at a time)."""
    if settings.judge_engine == "openai":
        return served.get_engine(served.Endpoint(settings.judge_base_url, settings.judge_model, settings.judge_api,
                                                 settings.judge_tokenizer, settings.judge_api_key_env,
                                                 settings.judge_max_concurrency))
    return engines.get_engine(settings.judge_model, judge_engine_settings(settings))


def judge_engine_settings(settings: Settings) -> engines.EngineSettings:
    """The judge's engine: its own engine, dtype, TP size, memory share and context; prefix caching as the process's."""
    own = ("engine", "dtype", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len")
    return engines.EngineSettings(**{name: getattr(settings, f"judge_{name}") for name in own},
                                  enable_prefix_caching=settings.enable_prefix_caching)


def check_labeller(rows: list[dict], spans: list, settings: Settings, engine=None) -> list[list[bool]]:
    """Exact step labels: the expression-tree checker on built-in problems, equations elsewhere (no model). A step
    too large to verify is wrong; a built-in problem too large to check is refused (DataError naming the row)."""
    labels = []
    for row, row_spans in zip(rows, spans):
        steps = prompting.step_texts(row["completion"], row_spans)
        if arith_task.is_arith_problem(row["problem"]):
            try:
                labels.append(arith_task.check_steps(row["problem"], steps))
            except arith_task.TooLarge as error:
                raise jsonl.DataError(f"row {row['id']!r}: field 'problem': {error}: it cannot be checked") from None
        else:
            labels.append(equations.label_steps_by_equations(steps))
    return labels


def judge_labeller(rows: list[dict], spans: list, settings: Settings, engine=None) -> list[list]:
    """The LLM judge's verdict per step (greedy), by --judge_protocol: one call per step or per solution (CUT_OFF
    where the reply was cut off); with --judge_verdict logprobs a score per step instead (verdict_score: the first
    word decides, so a reply cut off after it still has one)."""
    engine = engine or get_judge(settings)
    logprobs = JUDGE_TOP_LOGPROBS if settings.judge_verdict == "logprobs" else 0
    greedy = engines.Sampling(1, 0.0, 1.0, settings.judge_max_new_tokens, logprobs)
    solutions = [(r["problem"], r.get("solution"), prompting.step_texts(r["completion"], s))
                 for r, s in zip(rows, spans)]
    ask = lambda prompts: [o[0] for o in engine.generate(prompts, greedy, settings.seed)]  # noqa: E731
    if settings.judge_protocol == "first_error":
        return judging.judge_first_error_verdicts(solutions, engine.tokenizer, ask)
    pieces = judging.verdict_pieces(engine.tokenizer) if logprobs else None
    verdict = (lambda s: judging.verdict_score(s.logprobs, pieces)) if logprobs else judging.text_verdict
    return judging.judge_step_verdicts(solutions, engine.tokenizer, ask, verdict)


def solution_prefixes(completion: str, spans: list[tuple[int, int]]) -> list[str]:
    """The completion through the end of each step (``spans``), followed by the step separator."""
    return [completion[:end] + prompting.STEP_SEPARATOR for _, end in spans]


def mc_step_labels(rows: list[dict], spans: list, rollout_fn, threshold: int) -> list[list[bool]]:
    """Step k is right when >= ``threshold`` rollouts from the prefix through step k reach the gold answer.
    rollout_fn(prompts) -> [[continuation text] * K per prompt], all prefixes of all rows in one call. A rollout's
    answer is the last \\boxed{} of (prefix + continuation): one that stops at once after the answer keeps it."""
    prefixes = [solution_prefixes(r["completion"], s) for r, s in zip(rows, spans)]
    flat = [(row, prefix) for row, per_row in zip(rows, prefixes) for prefix in per_row]
    rollouts = rollout_fn([row["prompt"] + prefix for row, prefix in flat]) if flat else []  # (P, K)
    golds = [row["answer"] for (row, _), conts in zip(flat, rollouts) for _ in conts]
    preds = [grading.extract_boxed(prefix + c) for (_, prefix), conts in zip(flat, rollouts) for c in conts]
    reached = iter(grading.grade_answers(golds, preds) if preds else [])
    hits = iter([sum(next(reached) for _ in conts) for conts in rollouts])
    return [[next(hits) >= threshold for _ in per_row] for per_row in prefixes]


def mc_labeller(rows: list[dict], spans: list, settings: Settings, engine=None) -> list[list[bool]]:
    """Math-Shepherd labels from K policy rollouts per step; the chunk is seeded from (seed, its row ids)."""
    if engine is None and not settings.policy_model:
        raise ValueError("--prm mc needs --policy_model (label_file fills it in from the rows' gen.model)")
    engine = engine or engines.get_engine(settings.policy_model, settings)
    sampling = engines.Sampling(settings.mc_rollouts, settings.mc_temperature, 1.0, settings.mc_max_new_tokens)
    seed = sharding.derived_seed(settings.seed, [r["id"] for r in rows])
    texts = lambda prompts: [[o.text for o in outs] for outs in engine.generate(prompts, sampling, seed)]  # noqa: E731
    return mc_step_labels(rows, spans, texts, settings.mc_threshold)


def policy_model_of(rows: list[dict], path: str) -> str:
    """The one model that sampled ``rows`` (their gen.model), for mc rollouts without --policy_model."""
    for index, row in enumerate(rows, start=1):
        gen = row.get("gen")
        if not isinstance(gen, dict) or not isinstance(gen.get("model"), str):
            raise jsonl.DataError(f"{path}: row {index} (id {row['id']!r}): field 'gen.model' missing; "
                                  "pass --policy_model")
    models = sorted({row["gen"]["model"] for row in rows})
    if len(models) > 1:
        raise jsonl.DataError(f"{path}: field 'gen.model': rows were sampled by {len(models)} models {models}; "
                              "pass --policy_model")
    return models[0]


@functools.cache
def get_prm(settings: Settings) -> tuple:
    """(tokenizer, PRMSpec, score(encoded solutions) -> [[P(step right) per step] per solution]) of the PRM, loaded
    once per process: its model in this process, or its server, checked to serve it."""
    tokenizer, spec = prm_models.load_spec(settings.prm_model, settings.prm_format, settings.prm_step_tag,
                                           settings.prm_good_token, settings.prm_bad_token)
    if settings.prm_base_url:  # reached with the served judge's key variable and concurrency
        served_prm = served.Endpoint(settings.prm_base_url, settings.prm_model, api_key_env=settings.judge_api_key_env,
                                     max_concurrency=settings.judge_max_concurrency)
        served.check_endpoint(served_prm)
        return tokenizer, spec, lambda encoded, rows: prm_models.parse_pooling_response(served.post_all(
            served_prm, "/pooling", [prm_models.pooling_request(settings.prm_model, encoded)])[0], spec, encoded, rows)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = prm_models.load_model(settings.prm_model, spec, engines.resolve_dtype(settings.prm_model, "auto"), device)
    return tokenizer, spec, lambda encoded, rows: prm_models.step_scores(model, spec, encoded)


def reward_model_labeller(rows: list[dict], spans: list, settings: Settings, engine=None) -> list[list[float]]:
    """P(step right) of every step from a trained PRM, one forward pass per solution; rows without steps get none."""
    tokenizer, spec, score = get_prm(settings)
    scored = [i for i, row_spans in enumerate(spans) if row_spans]
    names = [f"row {rows[i]['id']!r}" for i in scored]
    encoded = [prm_models.encode_solution(tokenizer, spec, rows[i]["problem"],
                                          prompting.step_texts(rows[i]["completion"], spans[i]), name)
               for i, name in zip(scored, names)]
    scores = dict(zip(scored, score(encoded, names) if encoded else []))
    return [scores.get(i, []) for i in range(len(rows))]


# ----------------------------------------------------------------------------- rows

LABELLERS = {"check": check_labeller, "judge": judge_labeller, "mc": mc_labeller, "reward_model": reward_model_labeller}


def labels_from_verdicts(verdicts: list) -> tuple[list[bool | None], int, int]:
    """(step labels: the verdicts, None for a step without one; the steps without a verdict; those of them whose
    reply was cut off, CUT_OFF)."""
    labels = [None if v is judging.CUT_OFF else v for v in verdicts]
    return labels, sum(v is None for v in labels), sum(v is judging.CUT_OFF for v in verdicts)


def step_scorer(settings: Settings) -> tuple[float, dict] | None:
    """(threshold, the row's ``step_scorer`` field: the settings that decide the scores, not the threshold nor how a
    server is reached) of a labeller that scores steps (P(step right) per step); None for one that gives verdicts."""
    if settings.prm == "reward_model":
        tag = {"step_tag": settings.prm_step_tag, "good_token": settings.prm_good_token,
               "bad_token": settings.prm_bad_token} if settings.prm_format == "step_tag" else {}
        return settings.prm_threshold, {"prm": "reward_model", "model": settings.prm_model,
                                        "format": settings.prm_format, **tag}
    if settings.prm == "judge" and settings.judge_verdict == "logprobs":
        return settings.judge_threshold, {"prm": "judge", "model": settings.judge_model,
                                          "protocol": settings.judge_protocol, "verdict": settings.judge_verdict}
    return None


def label_rows(rows: list[dict], settings: Settings) -> list[dict]:
    """Outcome label (math-verify, gold first, hard timeout) and one label per step (Section 2.1), the steps split
    here, once. A scoring labeller's scores are written as step_scores, with their step_scorer, and thresholded into
    the labels; rows that carry this scorer's step_scores (labelled again with another threshold) keep them."""
    spans = [prompting.step_spans(r["completion"]) for r in rows]
    preds = [grading.extract_boxed(r["completion"]) for r in rows]
    outcomes = grading.grade_answers([r["answer"] for r in rows], preds)
    threshold, scorer = step_scorer(settings) or (None, None)
    kept = [scorer is not None and r.get("step_scorer") == scorer and len(r.get("step_scores") or []) == len(s)
            for r, s in zip(rows, spans)]
    todo = [i for i, keep in enumerate(kept) if not keep]
    fresh = iter(LABELLERS[settings.prm]([rows[i] for i in todo], [spans[i] for i in todo], settings) if todo else [])
    out = []
    for row, row_spans, pred, outcome, keep in zip(rows, spans, preds, outcomes, kept):
        verdicts = row["step_scores"] if keep else next(fresh)
        scores = {"step_scores": verdicts, "step_scorer": scorer} if scorer is not None else {}
        if threshold is not None:
            verdicts = [None if score is None else score >= threshold for score in verdicts]
        labels, failures, cutoffs = labels_from_verdicts(verdicts)
        out.append({**row, "completions": prompting.step_texts(row["completion"], row_spans), "step_spans": row_spans,
                    "labels": labels, **scores, "outcome": outcome, "pred": pred, "prm": settings.prm,
                    "prm_failures": failures, "prm_cutoffs": cutoffs})
    return out


# The share of steps cut off at the judge's token budget from which the summary says to raise the budget.
CUTOFF_WARNING_SHARE = 0.05


def summary(rows: list[dict]) -> str:
    steps = sum(len(r["labels"]) for r in rows)
    right, wrong = (sum(r["labels"].count(verdict) for r in rows) for verdict in (True, False))
    failures, cutoffs = sum(r["prm_failures"] for r in rows), sum(r["prm_cutoffs"] for r in rows)
    line = (f"{len(rows)} samples, {steps} steps: {right} right, {wrong} wrong, {failures} without a verdict "
            f"(no evidence: left out of the step level)")
    if cutoffs:
        line += f", {cutoffs} of them because the judge's reply was cut off at its token budget"
    if cutoffs and cutoffs >= CUTOFF_WARNING_SHARE * steps:
        line += f" ({cutoffs / steps:.0%} of the steps: raise --judge_max_new_tokens)"
    return line


def labeller_settings(settings: Settings) -> str:
    """One line saying which model labels, and how: the judge's endpoint or engine, the rollout policy's engine."""
    if settings.prm == "check":
        return "step labeller: check (exact, no model)"
    if settings.prm == "reward_model":
        where = f"served at {cli.redact_url(settings.prm_base_url)}" if settings.prm_base_url else "in this process"
        return (f"step labeller: reward_model {settings.prm_model} {where}, format {settings.prm_format}, "
                f"threshold {settings.prm_threshold}")
    if settings.prm == "mc":
        return (f"step labeller: mc with {settings.policy_model} (engine {settings.engine}, dtype {settings.dtype}, "
                f"tensor_parallel_size {settings.tensor_parallel_size}; {settings.mc_rollouts} rollouts of up to "
                f"{settings.mc_max_new_tokens} tokens)")
    where = (f"served at {cli.redact_url(settings.judge_base_url)} (api {settings.judge_api}, up to "
             f"{settings.judge_max_concurrency} requests at once)" if settings.judge_engine == "openai" else
             f"(engine {settings.judge_engine}, dtype {settings.judge_dtype}, tensor_parallel_size "
             f"{settings.judge_tensor_parallel_size})")
    verdict = settings.judge_verdict + (f", threshold {settings.judge_threshold}" if step_scorer(settings) else "")
    return (f"step labeller: judge with {settings.judge_model} {where}; protocol {settings.judge_protocol}, verdict "
            f"{verdict}, up to {settings.judge_max_new_tokens} tokens per reply")


def check_references(rows: list[dict], settings: Settings, path: str) -> None:
    """The paper's judge compares each step with a reference solution (Section 2.1): say how many rows lack
    one, and refuse when none has one (unless --allow_missing_reference)."""
    if settings.prm != "judge":
        return
    missing = sum(not isinstance(r.get("solution"), str) or not r["solution"].strip() for r in rows)
    if missing == len(rows) and not settings.allow_missing_reference:
        raise jsonl.DataError(
            f"{path}: no row has a reference solution (field 'solution'), which the judge compares each step with: "
            "sample from problems that carry one (e.g. math_train, gsm8k_train), or pass --allow_missing_reference")
    if missing:
        print(f"{path}: {missing} of {len(rows)} rows have no reference solution: the judge sees none for them",
              flush=True)


def label_file(samples: str, output: str, settings: Settings, chunk_size: int = 1024,
               shard: sharding.Shard = sharding.Shard(), on_change: str = "stop") -> bool:
    """Label this shard's chunks (``chunk_size`` rows each) of the SAMPLE_ROW rows of ``samples`` into ``output``
    (LABELLED_ROW rows), resuming after the chunks a killed run of the same provenance finished; True once complete."""
    check_args(settings)
    inputs = {"samples": provenance.file_input(samples)}  # the bytes as they are when the stage starts
    rows = jsonl.read_jsonl(samples, jsonl.SAMPLE_ROW)
    if settings.prm == "mc" and not settings.policy_model:
        settings = replace(settings, policy_model=policy_model_of(rows, samples))
    if provenance.settle_jsonl(output, labelling_provenance(settings, inputs, chunk_size), on_change):
        return True
    check_references(rows, settings, samples)
    chunks = sharding.chunked(rows, chunk_size)
    try:
        return label_chunks([[r["id"] for r in c] for c in chunks], chunks.__getitem__, output, settings, shard)
    except jsonl.DataError as error:  # a labeller names the row by its id ("row 'p3#1': step 2 ..."); add the file
        raise jsonl.DataError(f"{samples}: {error}" if str(error).startswith("row ") else str(error)) from None


# How a served judge is reached: settings that never change what it replies, left out of the provenance record.
TRANSPORT = ("judge_base_url", "judge_api_key_env", "judge_max_concurrency", "prm_base_url")
# The models a labeller may use: recorded by what they are (provenance.model_identity), not by their paths.
LABELLER_MODELS = ("judge_model", "judge_tokenizer", "prm_model", "policy_model")


def labelling_provenance(settings: Settings, inputs: dict, chunk_size: int) -> dict:
    """The labels' provenance record: the samples, the labeller's models and every setting that decides a label,
    only those that apply to this labeller (stepkto/options.py), never how a server is reached."""
    applied = options.applicable("label.py", settings)
    values = {f.name: getattr(applied, f.name) for f in fields(Settings) if f.name not in TRANSPORT + LABELLER_MODELS}
    models = {name: provenance.model_identity(getattr(applied, name)) for name in LABELLER_MODELS
              if getattr(applied, name)}
    return provenance.make_record("label.py", inputs, models, {**values, "chunk_size": chunk_size})


def label_chunks(chunk_ids: list[list[str]], rows_of_chunk, output: str, settings: Settings,
                 shard: sharding.Shard) -> bool:
    """Label chunk i's rows (``rows_of_chunk(i)``, ids ``chunk_ids[i]``) for this shard's chunks into ``output``,
    whose provenance the caller settled; True when ``output`` is complete, after which the summary line is printed."""
    print(labeller_settings(settings), flush=True)
    label = lambda i: label_rows(rows_of_chunk(i), settings)  # noqa: E731
    done = sharding.write_chunks(output, chunk_ids, label, jsonl.LABELLED_ROW, shard, f"label ({settings.prm})")
    if done:
        print(f"labelled {summary(jsonl.read_jsonl(output, jsonl.LABELLED_ROW))} into {output}")
    return done


def main(args: Args) -> None:
    options.refuse_inapplicable("label.py", args, engine=lambda: engines.resolve_engine(args.engine),
                                judge_engine=lambda: engines.resolve_engine(args.judge_engine))
    shard = args.shard()
    if not label_file(args.input, args.output, args, args.chunk_size, shard, args.on_change):
        print(f"shard {shard.index} of {shard.count} done: the last shard to finish writes {args.output}")


if __name__ == "__main__":
    cli.run_cli(Args, main)
