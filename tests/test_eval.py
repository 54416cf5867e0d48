"""Evaluation: the judge client against a local OpenAI-compatible server in a thread, score parsing, exact-match
tasks, and batched greedy generation equal to one prompt at a time."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from llmscratch.errors import UserError
from llmscratch.eval.judge import ChatClient, chat_endpoint, judge_file, judge_prompt, parse_score
from llmscratch.prompts import get_style

RESPONSES = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "model_response": "Red."},
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5", "model_response": "5"},
]


class FakeJudge:
    """A chat-completions server; `replies` is a list of (status, body) served in order, the last repeated."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append((self.path, body))
                status, payload = judge.replies.pop(0) if len(judge.replies) > 1 else judge.replies[0]
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def completion(text):
    return 200, {"choices": [{"message": {"role": "assistant", "content": text}}]}


def write_responses(tmp_path, records=RESPONSES):
    path = tmp_path / "test_responses.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("reply,score", [
    ("85", 85), ("Score: 85/100", 85), ("**90**", 90), ("On a scale from 0 to 100, I give 72.5.", 73),
    ("I'd rate it 60 out of 100", 60), ("0", 0), ("100", 100), ("The response is wrong.", None), ("250", None),
])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_judge_prompt_is_the_books():
    prompt = judge_prompt(RESPONSES[1])
    assert prompt.startswith("Given the input `Below is an instruction that describes a task.")
    assert "### Input:\n2 + 3` and correct output `5`, score the model response `5` on a scale from 0 to 100" in prompt
    assert prompt.endswith("Respond with the integer number only.") and "### Response:" not in prompt


def test_chat_endpoint_forms():
    assert chat_endpoint("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_endpoint("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_endpoint("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    with pytest.raises(UserError, match="http"):
        chat_endpoint("localhost:11434")


def test_good_replies_scores_file_and_mean(tmp_path):
    path = write_responses(tmp_path)
    with FakeJudge([completion("20"), completion("Score: 95")]) as srv:
        result = judge_file(path, ChatClient(srv.url, "judge-model", retries=0), progress=False)
    assert result.mean == 57.5 and result.scored == 2 and result.unscored == 0
    assert result.out == tmp_path / "test_responses.scores.json"
    saved = json.loads(result.out.read_text())
    assert [r["score"] for r in saved["records"]] == [20, 95]
    assert saved["records"][0]["model_response"] == "Red." and saved["mean"] == 57.5
    route, body = srv.requests[0]
    assert route == "/v1/chat/completions" and body["model"] == "judge-model" and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": judge_prompt(RESPONSES[0])}]


def test_reply_without_a_number_is_kept_unscored(tmp_path):
    path = write_responses(tmp_path)
    with FakeJudge([completion("I cannot judge this."), completion("40")]) as srv:
        result = judge_file(path, ChatClient(srv.url, "m", retries=0), progress=False)
    assert (result.mean, result.scored, result.unscored) == (40.0, 1, 1)
    saved = json.loads(result.out.read_text())["records"]
    assert saved[0]["score"] is None and saved[0]["judge_reply"] == "I cannot judge this."


def test_retries_transient_failures_then_succeeds():
    replies = [(503, {"error": "loading"}), (200, b"<html>not json</html>"), completion("70")]
    with FakeJudge(replies) as srv:
        assert ChatClient(srv.url, "m", retries=2, backoff=0).complete("hi") == "70"
    assert len(srv.requests) == 3


def test_garbage_reply_fails_after_retries():
    with FakeJudge([(200, b"garbage")]) as srv:
        with pytest.raises(UserError, match="failed after 2 tries .*not an OpenAI chat completion"):
            ChatClient(srv.url, "m", retries=1, backoff=0).complete("hi")
    assert len(srv.requests) == 2


def test_client_error_is_not_retried():
    with FakeJudge([(404, {"error": "model 'nope' not found"})]) as srv:
        with pytest.raises(UserError, match="HTTP 404.*not found.*--model 'nope'"):
            ChatClient(srv.url, "nope", retries=3, backoff=0).complete("hi")
    assert len(srv.requests) == 1


def test_cli_judge_end_to_end_and_server_down(tmp_path, capsys):
    from llmscratch.cli import main

    path = write_responses(tmp_path)
    with FakeJudge([completion("80")]) as srv:
        code = main(["eval", "judge", str(path), "--url", srv.url, "--model", "m", "--retries", "0",
                     "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "mean score 80.00 over 2 responses" in out
    # a port nobody listens on: one line, exit 2
    srv = FakeJudge([completion("1")])
    dead = srv.url
    srv.server.server_close()
    scores = path.with_name("test_responses.scores.json")
    first = scores.read_bytes()
    code = main(["eval", "judge", str(path), "--url", dead, "--model", "m", "--no-progress"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err  # the earlier scores are not replaced unasked
    code = main(["eval", "judge", str(path), "--url", dead, "--model", "m", "--retries", "1", "--timeout", "2",
                 "--no-progress", "--overwrite"])
    out, err = capsys.readouterr()
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "failed after 2 tries" in err and "ollama serve" in err
    assert scores.read_bytes() == first  # nothing scored, nothing rewritten
    code = main(["eval", "judge", str(tmp_path / "missing.json"), "--model", "m"])
    assert code == 2 and "responses file not found" in capsys.readouterr().err


def test_responses_file_checked(tmp_path):
    path = write_responses(tmp_path, [{"instruction": "a", "output": "b"}])
    with pytest.raises(UserError, match="record 1: no string .model_response.; pass --response-key"):
        judge_file(path, ChatClient("http://127.0.0.1:9", "m"), progress=False)


# ---------------------------------------------------------------------------------------------------------
# exact-match tasks and batched generation


@pytest.fixture(scope="module")
def tiny():
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT
    from llmscratch.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["byte level"], 257, progress=False)  # bytes + <|endoftext|>
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size, context_length=128)).eval()
    return model, tok


def test_generate_batch_equals_one_prompt_at_a_time(tiny):
    from llmscratch.generate import generate, generate_batch

    model, tok = tiny
    prompts = ["abc", "xyz", "hello", "abd", "hi", "world"]  # lengths 3, 3, 5, 3, 2, 5: three batches
    stop = ["e"]
    batched = generate_batch(model, tok, prompts, max_new_tokens=12, stop=stop, batch_size=2)
    assert batched == [generate(model, tok, p, max_new_tokens=12, stop=stop) for p in prompts]


def test_evaluate_tasks_scores_per_family(tiny, monkeypatch):
    import importlib

    from llmscratch.eval.tasks import evaluate_tasks

    gen = importlib.import_module("llmscratch.generate")  # the module (the package re-exports `generate`)

    model, tok = tiny
    records = [{"instruction": "q1", "input": "", "output": "4", "family": "arithmetic"},
               {"instruction": "q2", "input": "", "output": "7", "family": "arithmetic"},
               {"instruction": "q3", "input": "", "output": "a b", "family": "spelling"}]
    answers = {"q1": " 4<|end|>junk", "q2": "8", "q3": "a b\n"}
    monkeypatch.setattr(gen, "generate_batch",
                        lambda m, t, prompts, **kw: [answers[p.split("\n")[1].split("<")[0]] for p in prompts])
    report = evaluate_tasks(model, tok, records, get_style("phi3"), progress=False)
    assert {k: (v.n, v.correct) for k, v in report.families.items()} == {"arithmetic": (2, 1), "spelling": (1, 1)}
    assert report.overall.correct == 2 and abs(report.overall.accuracy - 2 / 3) < 1e-9
    assert [r["model_response"] for r in report.records] == ["4", "8", "a b"]
    table = report.table()
    assert "arithmetic" in table and "50.0%" in table and "overall" in table and "66.7%" in table
