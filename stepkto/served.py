"""A model served over an OpenAI-compatible HTTP API (a vLLM or SGLang server, a hosted API) as an ``engines.Engine``:
the paper's judge (Step-KTO, arXiv 2501.10799, Section 2.1), served once instead of loaded by every stage.

``completions`` sends the prompt's token ids as the in-process engines encode them; ``chat`` sends the user message.
A request that fails for good stops the stage and never becomes a label; the key is read from ``$api_key_env`` and
never written. docs/guide.md, "A judge served over HTTP", gives the details.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from stepkto import cli, engines, jsonl, models, prompting

Api = Literal["completions", "chat"]
# Seconds a request may take before it is retried (a long reply of a large judge under load fits), and the retries
# of a transient fault before the stage stops.
TIMEOUT_S = 600.0
RETRIES = 5


@dataclass(frozen=True)
class Endpoint:
    """Where the served model is and how it is called; none of this decides what it replies."""
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str  # the model's name as the server knows it (GET /v1/models)
    api: Api = "completions"
    tokenizer: str = ""  # completions: folder or hub id of the tokenizer prompts are encoded with ("": model)
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (unset: "EMPTY")
    max_concurrency: int = 8  # requests in flight at once


class ServedError(jsonl.StageError):
    """A request that failed for good: the message names the endpoint and the error, any URL in it redacted."""

    def __init__(self, message: str):
        super().__init__(cli.redact_urls(message))


def credentials(base_url: str) -> tuple[str, dict[str, str]]:
    """(``base_url`` without its userinfo, the headers its ``user:pass@`` authenticates with: HTTP Basic auth)."""
    userinfo, at, _ = urllib.parse.urlsplit(base_url).netloc.rpartition("@")
    if not at:
        return base_url, {}
    pair = ":".join(urllib.parse.unquote(part) for part in userinfo.partition(":")[::2]).encode()
    return base_url.replace(userinfo + at, "", 1), {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}


def client_of(endpoint: Endpoint):
    """The openai client of ``endpoint``: TIMEOUT_S per request, RETRIES retries with the library's own backoff."""
    import openai

    key = os.environ.get(endpoint.api_key_env) or "EMPTY"  # a vLLM server started without --api-key takes any
    url, basic = credentials(endpoint.base_url)  # Basic auth replaces the key's Bearer header
    return openai.AsyncOpenAI(base_url=url, api_key=key, default_headers=basic, timeout=TIMEOUT_S,
                              max_retries=RETRIES)


def failure(endpoint: Endpoint, error: Exception) -> Exception:
    """A request's final failure as one line naming the endpoint (the error itself when it is no API error)."""
    import openai

    if isinstance(error, openai.APIStatusError):
        hint = {401: f" (the key in ${endpoint.api_key_env} was refused)",
                403: f" (the key in ${endpoint.api_key_env} may not use {endpoint.model})",
                404: f" (does the server serve {endpoint.model!r} on this API?)"}.get(error.status_code, "")
        return ServedError(f"{shown(endpoint)}: HTTP {error.status_code}{hint}: {error.message}")
    if isinstance(error, openai.APIConnectionError):  # timeouts included
        cause = f": {error.__cause__}" if error.__cause__ else ""
        return ServedError(f"{shown(endpoint)}: {error.message}{cause} (after {RETRIES} retries)")
    return error


def shown(endpoint: Endpoint) -> str:
    """The endpoint's URL as messages show it: its user, password and secret query values as ***."""
    return cli.redact_url(endpoint.base_url)


def check_endpoint(endpoint: Endpoint) -> None:
    """Before the first chunk: the server answers and serves ``endpoint.model`` (GET /v1/models)."""
    async def names(client, _, __) -> list[str]:
        return [m.id async for m in client.models.list()]

    served = asyncio.run(gather(endpoint, [None], names))[0]
    if endpoint.model not in served:
        raise ServedError(f"{shown(endpoint)}: serves {served}, not {endpoint.model!r}: pass the served name")


_ENGINES: dict = {}  # Endpoint -> engines.Engine: one tokenizer per endpoint and process


def get_engine(endpoint: Endpoint) -> engines.Engine:
    """The served model as an engine, once the server is seen to serve it: ``generate(prompts, sampling, seed)``
    takes prompt texts (completions) or chat message lists (chat, whose ``tokenizer`` is None)."""
    if endpoint not in _ENGINES:
        check_endpoint(endpoint)
        tokenizer, stops = None, []
        if endpoint.api == "completions":
            tokenizer = models.load_tokenizer(endpoint.tokenizer or endpoint.model)
            stops = engines.stop_token_ids(tokenizer, engines.generation_config(endpoint.tokenizer or endpoint.model))

        def generate(prompts: list, sampling: engines.Sampling, seed: int) -> list[list[engines.Sample]]:
            one = functools.partial(ask, endpoint, tokenizer, stops, sampling, seed)
            return asyncio.run(gather(endpoint, prompts, one))  # (P, n)

        _ENGINES[endpoint] = engines.Engine(tokenizer, generate, None, lambda: None)
    return _ENGINES[endpoint]


def post_all(endpoint: Endpoint, path: str, bodies: list[dict]) -> list:
    """The JSON replies to ``bodies`` POSTed, in order, to ``path`` from the server root (/pooling lies beside /v1)."""
    url = credentials(endpoint.base_url)[0].rstrip("/").removesuffix("/v1") + path  # userinfo: client's Basic auth
    return asyncio.run(gather(endpoint, bodies, lambda client, _, body: client.post(url, cast_to=object, body=body)))


async def gather(endpoint: Endpoint, items: list, one) -> list:
    """[await one(client, i, item) per item], at most ``max_concurrency`` in flight; the first request that fails
    for good cancels all the others and is raised as one line."""
    from tqdm import tqdm

    limit, progress = asyncio.Semaphore(endpoint.max_concurrency), tqdm(total=len(items), leave=False,
                                                                        desc=f"requests to {endpoint.model}")

    async def bounded(client, i: int, item):
        async with limit:
            result = await one(client, i, item)
        progress.update()
        return result

    try:
        async with client_of(endpoint) as client, asyncio.TaskGroup() as group:
            tasks = [group.create_task(bounded(client, i, item)) for i, item in enumerate(items)]
    except BaseExceptionGroup as errors:
        raise failure(endpoint, errors.exceptions[0]) from None
    finally:
        progress.close()
    return [task.result() for task in tasks]


async def ask(endpoint: Endpoint, tokenizer, stops: list[int], sampling: engines.Sampling, seed: int, client,
              i: int, prompt) -> list[engines.Sample]:
    """Prompt i through /v1/completions as its token ids, or through /v1/chat/completions as its messages (text
    replies, no token ids); seeded with seed + i * n, as the vLLM engine seeds it."""
    common = dict(model=endpoint.model, n=sampling.n, temperature=sampling.temperature, seed=seed + i * sampling.n,
                  top_p=sampling.top_p if sampling.temperature > 0 else 1.0)
    if endpoint.api == "chat":
        logprobs = {"logprobs": True, "top_logprobs": sampling.logprobs} if sampling.logprobs else {}
        reply = await client.chat.completions.create(messages=prompt, max_completion_tokens=sampling.max_new_tokens,
                                                     **logprobs, **common)
        return [chat_sample(choice) for choice in checked(endpoint, reply, sampling)]
    prompt_ids = prompting.encode_prompt(tokenizer, prompt)
    neutral = {"repetition_penalty": 1.0, "top_k": -1, "min_p": 0.0}  # not the checkpoint's generation defaults
    extra = {"stop_token_ids": stops, **neutral, "return_token_ids": True, "return_tokens_as_token_ids": True}
    reply = await client.completions.create(
        prompt=prompt_ids, max_tokens=sampling.max_new_tokens, logprobs=sampling.logprobs or None,
        presence_penalty=0.0, frequency_penalty=0.0, extra_body=extra, **common)
    return [completion_sample(tokenizer, prompt_ids, choice, stops) for choice in checked(endpoint, reply, sampling)]


def completion_sample(tokenizer, prompt_ids: list[int], choice, stops: list[int]) -> engines.Sample:
    """A /v1/completions choice as the in-process engines' Sample: text decoded from the reply's token ids when
    the server gives them (vLLM), else the server's own text and no ids."""
    finish = "length" if choice.finish_reason == "length" else "stop"
    ids = getattr(choice, "token_ids", None)
    if ids is None:
        sample = engines.Sample(choice.text, finish, prompt_ids, [])
    else:
        ids, reason = list(ids), getattr(choice, "stop_reason", None)
        if finish == "stop" and (not ids or ids[-1] not in stops) and (isinstance(reason, int) or stops):
            ids.append(reason if isinstance(reason, int) else stops[0])  # the stop token, as the vLLM engine keeps it
        sample = engines.make_sample(tokenizer, prompt_ids, ids, stops)
    if choice.logprobs is None:
        return sample
    entries = [served_logprobs(tokenizer, token, top or {})
               for token, top in zip(choice.logprobs.tokens, choice.logprobs.top_logprobs)]
    return sample._replace(logprobs=entries[: len(sample.completion_ids)] if sample.completion_ids else entries)


def served_logprobs(tokenizer, token: str, top: dict[str, float]) -> engines.TokenLogprobs:
    """One position's log-probs: vLLM names tokens "token_id:<id>" (return_tokens_as_token_ids), decoded here with
    the judge's tokenizer as the in-process engines decode them; other servers name them by their text."""
    found = [re.fullmatch(r"token_id:(-?\d+)", name) for name in [token, *top]]
    if not all(found):
        return engines.TokenLogprobs(token, dict(top))
    ids = [int(match.group(1)) for match in found]
    return engines.token_logprobs(tokenizer, ids[0], zip(ids[1:], top.values()))


def chat_sample(choice) -> engines.Sample:
    finish = "length" if choice.finish_reason == "length" else "stop"
    entries = None
    if choice.logprobs is not None and choice.logprobs.content is not None:
        entries = [engines.TokenLogprobs(c.token, {t.token: t.logprob for t in c.top_logprobs})
                   for c in choice.logprobs.content]
    return engines.Sample(choice.message.content or "", finish, [], [], entries)


def checked(endpoint: Endpoint, reply, sampling: engines.Sampling) -> list:
    """The reply's n choices in order, with log-probs if asked for; anything else is an error, never a verdict."""
    choices = sorted(reply.choices, key=lambda c: c.index)
    if len(choices) != sampling.n:
        raise ServedError(f"{shown(endpoint)}: {len(choices)} choices in a reply, {sampling.n} asked for")
    if sampling.logprobs and any(c.logprobs is None for c in choices):
        raise ServedError(f"{shown(endpoint)}: a reply without the log-probs asked for (--judge_verdict logprobs "
                          f"needs a server that returns them)")
    return choices
