"""A model served over an OpenAI-compatible HTTP API (a vLLM or SGLang server, a hosted API) as a generation engine.

The paper's judge (Step-KTO, arXiv 2501.10799, Section 2.1) is a large LLM: users serve it once, on its own GPUs or
node, and every label and evaluate stage calls it, instead of loading it again in each stage's process. This module
gives label.py that judge as a ``engines.Engine``, the seam where the in-process engines plug in: prompts in,
``engines.Sample`` replies out, in the order of the prompts whatever order the server answers in.

Two APIs (``Endpoint.api``):

* ``completions`` (a self-hosted vLLM or SGLang server): ``POST /v1/completions`` with the prompt's token ids, encoded
  by ``prompting.encode_prompt`` with the judge's own tokenizer exactly as the in-process engines encode it (the BOS
  rule kept; a server never adds a second BOS to token ids). The server's own sampling defaults from the
  checkpoint's generation_config.json (vLLM applies repetition_penalty, top_k, min_p from it) are overridden with
  the neutral values the in-process engines use, and the reply's token ids are asked for (vLLM's
  ``return_token_ids``): the text is decoded from them as in-process. A server that ignores those fields still
  answers, with its own text.
* ``chat`` (any OpenAI-compatible API, hosted ones included): ``POST /v1/chat/completions`` with the same user
  message the in-process engines put through the judge tokenizer's chat template; the server applies its template.

Faults: the openai client retries timeouts (``TIMEOUT_S`` per request), refused or reset connections, 408, 409, 429
and 5xx replies ``RETRIES`` times with exponential backoff; after that, and at once on any other 4xx (a refused key, a model the
server does not serve), the stage stops with one line naming the endpoint and the error (``jsonl.StageError``).
A failed request therefore never becomes a reply, and so never a label: the chunk it belonged to is not written,
and a rerun resumes from the chunks before it. The key is read from the environment variable ``api_key_env`` and
never written anywhere; the URL never enters a resume signature. A URL's user and password (``http://user:pass@host``)
are sent as HTTP Basic auth, in place of the key (a request has one Authorization header), never in the URL a request
goes to or a log line of it; every message shows the URL with them as *** (``cli.redact_url``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import os
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from stepkto import cli, engines, jsonl, models, prompting

Api = Literal["completions", "chat"]
# Seconds a request may take before it is retried (a long reasoning reply of a large judge under load fits), and the
# retries of a transient fault before the stage stops.
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
    parts = urllib.parse.urlsplit(base_url)
    if "@" not in parts.netloc:
        return base_url, {}
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}".encode()
    return base_url.replace(parts.netloc, host, 1), {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}


def client_of(endpoint: Endpoint, asynchronous: bool = False):
    """The openai client of ``endpoint``: TIMEOUT_S per request, RETRIES retries with the library's own backoff."""
    import openai

    key = os.environ.get(endpoint.api_key_env) or "EMPTY"  # a vLLM server started without --api-key takes any
    kind = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    url, basic = credentials(endpoint.base_url)  # Basic auth replaces the key's Bearer header
    return kind(base_url=url, api_key=key, default_headers=basic, timeout=TIMEOUT_S, max_retries=RETRIES)


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
    import openai

    client = client_of(endpoint)
    try:
        served = [m.id for m in client.models.list()]
    except openai.OpenAIError as error:
        raise failure(endpoint, error) from None
    finally:
        client.close()
    if endpoint.model not in served:
        raise ServedError(f"{shown(endpoint)}: serves {served}, not {endpoint.model!r}: pass the served name")


_ENGINES: dict = {}  # Endpoint -> engines.Engine: one tokenizer per endpoint and process


def get_engine(endpoint: Endpoint) -> engines.Engine:
    """The served model as an engine, once the server is seen to serve it: ``generate(prompts, sampling, seed)``
    takes prompt texts (completions) or chat message lists (chat), and ``tokenizer`` is None for chat, whose prompts
    are the messages themselves."""
    if endpoint not in _ENGINES:
        check_endpoint(endpoint)
        tokenizer, stops = None, []
        if endpoint.api == "completions":
            tokenizer = models.load_tokenizer(endpoint.tokenizer or endpoint.model)
            stops = engines.stop_token_ids(tokenizer, engines.generation_config(endpoint.tokenizer or endpoint.model))
        ask = functools.partial(REQUESTS[endpoint.api], endpoint, tokenizer, stops)
        run = lambda prompts, sampling, seed: asyncio.run(ask_all(endpoint, ask, prompts, sampling, seed))  # noqa: E731
        _ENGINES[endpoint] = engines.Engine(tokenizer, run, None, lambda: None)
    return _ENGINES[endpoint]


async def ask_all(endpoint: Endpoint, ask, prompts: list, sampling: engines.Sampling, seed: int):
    """(P, n) samples: each reply put back at its prompt's place. Prompt i is seeded with seed + i * n, as the vLLM
    engine seeds it."""
    return await gather(endpoint, prompts, lambda client, i, prompt: ask(client, prompt, sampling, seed + i * sampling.n))


def post_all(endpoint: Endpoint, path: str, bodies: list[dict]) -> list:
    """The JSON replies to ``bodies`` POSTed to the server's ``path`` (from its root, e.g. /pooling: vLLM's pooling
    API lies beside /v1), in order, with the retries and failures of every request here."""
    url = credentials(endpoint.base_url)[0].rstrip("/").removesuffix("/v1") + path  # userinfo: the client's Basic header
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
        async with client_of(endpoint, asynchronous=True) as client, asyncio.TaskGroup() as group:
            tasks = [group.create_task(bounded(client, i, item)) for i, item in enumerate(items)]
    except BaseExceptionGroup as errors:
        raise failure(endpoint, errors.exceptions[0]) from None
    finally:
        progress.close()
    return [task.result() for task in tasks]


async def complete(endpoint: Endpoint, tokenizer, stops: list[int], client, prompt: str,
                   sampling: engines.Sampling, seed: int) -> list[engines.Sample]:
    """One prompt through /v1/completions, as its token ids."""
    prompt_ids = prompting.encode_prompt(tokenizer, prompt)
    neutral = {"repetition_penalty": 1.0, "top_k": -1, "min_p": 0.0}  # not the checkpoint's generation defaults
    extra = {"stop_token_ids": stops, **neutral, "return_token_ids": True, "return_tokens_as_token_ids": True}
    reply = await client.completions.create(
        model=endpoint.model, prompt=prompt_ids, n=sampling.n, max_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p if sampling.temperature > 0 else 1.0, seed=seed,
        logprobs=sampling.logprobs or None, presence_penalty=0.0, frequency_penalty=0.0, extra_body=extra)
    choices = checked(endpoint, sorted(reply.choices, key=lambda c: c.index), sampling)
    return [completion_sample(tokenizer, prompt_ids, choice, stops) for choice in choices]


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
    ids = [token_id(name) for name in [token, *top]]
    if None in ids:
        return engines.TokenLogprobs(token, dict(top))
    return engines.token_logprobs(tokenizer, ids[0], zip(ids[1:], top.values()))


def token_id(name: str) -> int | None:
    head, _, tail = name.partition(":")
    return int(tail) if head == "token_id" and tail.lstrip("-").isdigit() else None


async def chat(endpoint: Endpoint, tokenizer, stops: list[int], client, messages: list[dict],
               sampling: engines.Sampling, seed: int) -> list[engines.Sample]:
    """One prompt through /v1/chat/completions: the messages as they are; text replies, no token ids."""
    logprobs = {"logprobs": True, "top_logprobs": sampling.logprobs} if sampling.logprobs else {}
    reply = await client.chat.completions.create(
        model=endpoint.model, messages=messages, n=sampling.n, max_completion_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p if sampling.temperature > 0 else 1.0, seed=seed,
        **logprobs)
    choices = checked(endpoint, sorted(reply.choices, key=lambda c: c.index), sampling)
    return [chat_sample(choice) for choice in choices]


def chat_sample(choice) -> engines.Sample:
    finish = "length" if choice.finish_reason == "length" else "stop"
    entries = None
    if choice.logprobs is not None and choice.logprobs.content is not None:
        entries = [engines.TokenLogprobs(c.token, {t.token: t.logprob for t in c.top_logprobs})
                   for c in choice.logprobs.content]
    return engines.Sample(choice.message.content or "", finish, [], [], entries)


def checked(endpoint: Endpoint, choices: list, sampling: engines.Sampling) -> list:
    """The reply's n choices, each with log-probs when they were asked for; anything else is an error, never a
    reply read as a verdict."""
    if len(choices) != sampling.n:
        raise ServedError(f"{shown(endpoint)}: {len(choices)} choices in a reply, {sampling.n} asked for")
    if sampling.logprobs and any(c.logprobs is None for c in choices):
        raise ServedError(f"{shown(endpoint)}: a reply without the log-probs asked for (--judge_verdict logprobs "
                          f"needs a server that returns them)")
    return choices


REQUESTS = {"completions": complete, "chat": chat}
