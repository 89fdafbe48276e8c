"""A URL's user and password (http://user:pass@host/v1) and secret query values (?api_key=...) are never printed or
written: label.py's banner and settings record, stepkto/served.py's errors and request logs, run.sh's banner and
commands.log, the trackers' config. The request itself still authenticates, with HTTP Basic auth. Every server here
listens on 127.0.0.1."""

import base64
import json
import logging
import os
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from stepkto import cli, jsonl, served, tracking
import label
from helpers import REPO, free_port

PASSWORD = "pw-never-shown-7c2e"
QUERY_SECRET = "qs-never-shown-91fa"


# ----------------------------------------------------------------------------- redact_url, redact_urls


@pytest.mark.parametrize("url, shown", [
    ("http://user:pass@host:8000/v1", "http://***@host:8000/v1"),
    ("https://user@host/v1", "https://***@host/v1"),
    ("http://u:p@ss@host:1/v1", "http://***@host:1/v1"),  # an unencoded @ in the password: all of it goes
    ("http://host:8000/v1?api_key=abc&model=m", "http://host:8000/v1?api_key=***&model=m"),
    ("http://host/v1?x-api-key=a&APIKEY=b&token=c;password=d&key=e", "http://host/v1?x-api-key=***&APIKEY=***&token=***;password=***&key=***"),
    ("http://u:p@host/v1?access_token=t#frag", "http://***@host/v1?access_token=***#frag"),
])
def test_redact_url_hides_userinfo_and_secret_parameters(url, shown):
    assert cli.redact_url(url) == shown


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "https://api.example.com/v1?model=m&monkey=1&keyword=2",
                                 "http://host/a@b", "host:8000", ""])
def test_redact_url_leaves_a_url_without_credentials_as_it_is(url):
    assert cli.redact_url(url) == url


def test_redact_urls_redacts_every_url_of_a_text():
    text = ("Connection error: URL('http://alice:s3cret@127.0.0.1:9/v1/models') failed; then "
            "https://bob@h2/v1?token=t0k3n and http://plain:8000/v1.")
    assert cli.redact_urls(text) == ("Connection error: URL('http://***@127.0.0.1:9/v1/models') failed; then "
                                        "https://***@h2/v1?token=*** and http://plain:8000/v1.")
    assert cli.redact_urls("no url here: user:pass") == "no url here: user:pass"


# ----------------------------------------------------------------------------- label.py


def secret_url(port: int) -> str:
    return f"http://alice:{PASSWORD}@127.0.0.1:{port}/v1?api_key={QUERY_SECRET}"


def hides_secrets(text: str) -> bool:
    return PASSWORD not in text and QUERY_SECRET not in text


def test_labeller_settings_show_the_server_without_its_password():
    judge = label.Settings(prm="judge", judge_model="j", judge_engine="openai", judge_base_url=secret_url(9))
    prm = label.Settings(prm="reward_model", prm_model="p", prm_base_url=secret_url(9))
    for settings in (judge, prm):
        line = label.labeller_settings(settings)
        assert hides_secrets(line) and "served at http://***@127.0.0.1:9/v1?api_key=***" in line


def test_the_provenance_record_beside_the_output_holds_no_password(tmp_path):
    """OUT.provenance.json, written before the first chunk: how a server is reached is not what made the labels."""
    samples, output = tmp_path / "samples.jsonl", tmp_path / "labels.jsonl"
    jsonl.write_jsonl_atomic(samples, sample_rows())
    settings = label.Settings(prm="reward_model", prm_model="p", prm_base_url=secret_url(9))
    with pytest.raises(Exception):  # no PRM "p" to load: the record is written before
        label.label_file(str(samples), str(output), settings)
    record = (tmp_path / "labels.jsonl.provenance.json").read_text()
    assert hides_secrets(record) and "127.0.0.1:9" not in record and '"prm": "reward_model"' in record


def sample_rows() -> list[dict]:
    return [{"id": "p#0", "problem_id": "p", "problem": "1 + 1?", "answer": "2", "solution": "1 + 1 = 2.",
             "prompt": "1 + 1?", "completion": "1 + 1 = 2.\n\nThe answer is \\boxed{2}.", "finish_reason": "stop"}]


def test_a_refused_connection_names_the_endpoint_without_its_password(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(served, "RETRIES", 0)
    samples = tmp_path / "samples.jsonl"
    jsonl.write_jsonl_atomic(samples, sample_rows())
    port = free_port()  # nothing listens there
    args = label.Args(input=str(samples), output=str(tmp_path / "labels.jsonl"), prm="judge", judge_model="j",
                      judge_engine="openai", judge_base_url=secret_url(port), judge_api="chat")
    with pytest.raises(jsonl.StageError) as error:
        label.main(args)
    message = str(error.value)
    assert message.startswith(f"http://***@127.0.0.1:{port}/v1?api_key=***: Connection error") and hides_secrets(message)
    assert hides_secrets(capsys.readouterr().out)


# ----------------------------------------------------------------------------- stepkto/served.py: Basic auth


class Recorder(ThreadingHTTPServer):
    """An OpenAI-compatible server on 127.0.0.1 that serves model "m" and records each request's line and headers."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RecordingHandler)
        self.seen = []

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class RecordingHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, body: dict) -> None:
        self.server.seen.append((self.command, self.path, self.headers.get("Authorization")))
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer({"object": "list", "data": [{"id": "m", "object": "model"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.answer({"data": []})


def test_a_urls_user_and_password_authenticate_as_basic_auth_and_are_never_logged(monkeypatch, caplog):
    """The user and password (percent-decoded) go in an Authorization: Basic header, in place of the key's Bearer
    one; the URL the client requests, and the log line of each request, hold neither."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unused")
    caplog.set_level(logging.DEBUG)
    with Recorder() as server:
        port = server.server_address[1]
        endpoint = served.Endpoint(f"http://alice:{PASSWORD}%40x@127.0.0.1:{port}/v1", "m")
        served.check_endpoint(endpoint)
        served.post_all(endpoint, "/pooling", [{"input": [1]}])
        served.check_endpoint(served.Endpoint(f"http://127.0.0.1:{port}/v1", "m"))
    basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}@x".encode()).decode()
    assert server.seen == [("GET", "/v1/models", basic), ("POST", "/pooling", basic),
                           ("GET", "/v1/models", "Bearer sk-unused")]
    assert "/v1/models" in caplog.text and PASSWORD not in caplog.text


# ----------------------------------------------------------------------------- run.sh


def test_run_sh_shows_and_logs_the_judge_url_without_its_password(tmp_path):
    """run.sh's banner (print_settings) and commands.log, with a stub Python for which every stage succeeds at once:
    the URL is shown and logged with *** for its credentials, and label.py / evaluate.py still get it whole."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\nprintf "%s\\n" "$*" >> "$(dirname "$0")/argv.log"\nexit 0\n')
    stub.chmod(0o755)
    url = secret_url(9)
    env = {**os.environ, "PYTHON": str(stub), "GEN_PYTHON": str(stub), "RUNS": str(tmp_path / "runs"), "MODEL": "m",
           "TRAIN_PROBLEMS": "math_train", "BENCHMARK": "math500", "PRM": "judge", "JUDGE_MODEL": "j",
           "JUDGE_URL": url, "OBJECTIVES": "step-kto", "ITERATIONS": "1"}
    proc = subprocess.run(["bash", str(REPO / "run.sh")], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    log = (tmp_path / "runs" / "seed0" / "commands.log").read_text()
    assert "served at http://***@127.0.0.1:9/v1?api_key=***, api" in proc.stdout
    assert hides_secrets(proc.stdout + proc.stderr) and hides_secrets(log)
    assert "--judge_base_url http://***@127.0.0.1:9/v1\\?api_key=*** " in log  # printf %q's escape of ? kept
    assert all(f"--judge_base_url {url}" in line for line in (tmp_path / "argv.log").read_text().splitlines()
               if "label.py" in line or "evaluate.py" in line)


# ----------------------------------------------------------------------------- tracking


def test_safe_config_redacts_the_urls_of_every_string():
    config = {"judge_base_url": secret_url(9), "prm_base_url": "", "lr": 1e-5, "nested": {"urls": [secret_url(8)]}}
    assert tracking.safe_config(config) == {"judge_base_url": "http://***@127.0.0.1:9/v1?api_key=***",
                                            "prm_base_url": "", "lr": 1e-5,
                                            "nested": {"urls": ["http://***@127.0.0.1:8/v1?api_key=***"]}}


def test_the_wandb_config_holds_no_password(tmp_path, monkeypatch):
    """evaluate.py passes asdict(args) as the run's config: what wandb writes holds the URL without its password."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    config = {"judge_base_url": secret_url(9), "judge_model": "j"}
    with tracking.open_tracker("wandb", tmp_path / "tracking", "M1", config) as tracker:
        tracker.log({"eval/pass@1": 0.5}, step=1)
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"http://***@127.0.0.1:9/v1?api_key=***" in written  # the config was written, redacted
    assert PASSWORD.encode() not in written and QUERY_SECRET.encode() not in written
