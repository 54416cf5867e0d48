"""LLM-as-judge (the book's chapter 7.8): a larger model scores each answer 0-100 through any OpenAI-compatible
`/v1/chat/completions` endpoint — Ollama (`http://localhost:11434`), vLLM, llama.cpp's server, OpenAI.

Plain urllib, no client library. Transient failures (connection errors, timeouts, HTTP 408/429/5xx, a body
that is not a chat completion) are retried with exponential backoff; a reply without a usable number gets
no score and is counted, never guessed.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from llmscratch.errors import UserError, one_line

# The book's judge prompt, with the record rendered as its Alpaca instruction (without "### Response:").
JUDGE_TEMPLATE = ("Given the input `{input}` and correct output `{output}`, score the model response "
                  "`{response}` on a scale from 0 to 100, where 100 is the best score. "
                  "Respond with the integer number only.")

_SCALE = re.compile(r"\b0\s*(?:-|–|to)\s*100\b|(?:/|\bout of)\s*100\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)(?![\w])")


def judge_prompt(record: dict, response_key: str = "model_response") -> str:
    from llmscratch.prompts import get_style

    instruction = get_style("alpaca").prompt(record).removesuffix("\n\n### Response:\n")
    return JUDGE_TEMPLATE.format(input=instruction, output=record["output"], response=record[response_key])


def parse_score(reply: str) -> int | None:
    """The 0-100 score in a judge's reply, else None: the first number in range once the scale itself
    ("0 to 100", "0-100", "/100", "out of 100") is removed — "85", "Score: 85/100", "**90**",
    "On a scale from 0 to 100 I'd give 72.5" → 73 (halves round up)."""
    text = _SCALE.sub(" ", reply)
    for m in _NUMBER.finditer(text):
        value = float(m.group(1))
        if 0 <= value <= 100:
            return int(value + 0.5)
    return None


class ChatClient:
    """Minimal OpenAI-compatible chat client: `complete(prompt) -> reply text`."""

    def __init__(self, url: str, model: str, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 api_key: str | None = None, temperature: float = 0.0, seed: int | None = 123):
        self.endpoint = chat_endpoint(url)
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.api_key, self.temperature, self.seed = api_key, temperature, seed

    def complete(self, prompt: str) -> str:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": self.temperature, "stream": False}
        if self.seed is not None:
            body["seed"] = self.seed
        headers = {"Content-Type": "application/json", "User-Agent": "llmscratch"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode("utf-8")
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as exc:
                detail = one_line(exc.read(), empty="")[:200]
                if exc.code in (408, 429) or exc.code >= 500:
                    last = f"HTTP {exc.code} {exc.reason}"
                    continue
                raise UserError(f"{self.endpoint}: HTTP {exc.code} {exc.reason} ({detail}); check --model "
                                f"{self.model!r} and --url") from None
            except urllib.error.URLError as exc:
                last = one_line(exc.reason, empty="")
                continue
            except (TimeoutError, OSError) as exc:  # read timeouts, resets
                last = f"{type(exc).__name__}: {one_line(exc, empty='')}"
                continue
            try:
                reply = json.loads(payload)["choices"][0]["message"]["content"]
                if not isinstance(reply, str):
                    raise TypeError
                return reply
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
                last = f"the reply is not an OpenAI chat completion: {one_line(payload[:120], empty='')}"
                continue
        raise UserError(f"judge endpoint {self.endpoint} failed after {self.retries + 1} tries ({last}); is the "
                        f"server running (e.g. `ollama serve`) and does it serve --model {self.model!r}?")


def chat_endpoint(url: str) -> str:
    """`http://host:port`, `.../v1` or the full `.../v1/chat/completions` → the chat completions URL."""
    url = url.rstrip("/")
    if not re.match(r"^https?://", url):
        raise UserError(f"--url {url}: give an http(s) URL such as http://localhost:11434")
    if url.endswith("/chat/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/chat/completions"
    return url + "/v1/chat/completions"


@dataclass
class JudgeResult:
    mean: float | None
    scored: int
    unscored: int
    out: Path


def read_responses(path: str | Path, response_key: str) -> list[dict]:
    """Records to judge: a JSON list (or JSONL) of objects with `instruction`, `output` and the answer."""
    from llmscratch.data.files import read_json_objects

    records = read_json_objects(Path(path), missing="responses file not found (e.g. the test_responses.json of "
                                "finetune instruct)")
    for where, r in records:
        for key in ("instruction", "output", response_key):
            if not isinstance(r.get(key), str):
                hint = "; pass --response-key" if key == response_key else ""
                raise UserError(f"{where}: no string {key!r}{hint}")
    if not records:
        raise UserError(f"{path}: no records to judge")
    return [r for _, r in records]


def scores_path(responses: str | Path) -> Path:
    p = Path(responses)
    return p.with_name(p.stem + ".scores.json")


def judge_file(responses: str | Path, client: ChatClient, response_key: str = "model_response",
               out: str | Path | None = None, progress: bool = True, overwrite: bool = False) -> JudgeResult:
    """Score every record of `responses`; the records with `score` and `judge_reply` go to `out` (default:
    `<name>.scores.json` beside the input; a new file unless `overwrite`, never the input), rewritten atomically
    after each record so an interrupted run keeps what it has."""
    from tqdm import tqdm

    from llmscratch.fileio import atomic_write_text
    from llmscratch.runs import check_out_file

    out = Path(out) if out else scores_path(responses)
    check_out_file(out, overwrite, inputs=(responses,))
    records = read_responses(responses, response_key)
    scored: list[dict] = []

    def summary() -> dict:
        values = [r["score"] for r in scored if r["score"] is not None]
        return {"judge": {"endpoint": client.endpoint, "model": client.model}, "responses": str(responses),
                "response_key": response_key, "mean": sum(values) / len(values) if values else None,
                "scored": len(values), "unscored": len(scored) - len(values), "records": scored}

    for record in tqdm(records, desc="judge", unit="record", disable=not progress, dynamic_ncols=True):
        reply = client.complete(judge_prompt(record, response_key))
        scored.append({**record, "score": parse_score(reply), "judge_reply": reply})
        atomic_write_text(out, json.dumps(summary(), indent=1, ensure_ascii=False) + "\n")
    s = summary()
    return JudgeResult(s["mean"], s["scored"], s["unscored"], out)
