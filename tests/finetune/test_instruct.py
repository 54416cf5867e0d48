"""`llmscratch finetune instruct` end to end on a tiny model: the tuned folder, its saved prompt style used by
`generate` and `eval tasks`, learning a few answers exactly, resume, and bad input → one line, exit 2."""

import json

import pytest
import torch
import yaml
from clitools import run

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "blue", "family": "words"},
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5", "family": "sums"},
    {"instruction": "Add the numbers.", "input": "4 + 4", "output": "8", "family": "sums"},
    {"instruction": "Say hi.", "input": "", "output": "hi", "family": "words"},
]
STEPS = 100  # gpt-micro learns all four answers by then for each of seeds 0-4 (at 60 steps, 2 of 5 seeds did)
FAST = ["--epochs", "0", "--train.max_steps", "4", "--train.batch_size", "2", "--train.eval_every", "2",
        "--train.eval_batches", "1", "--train.warmup_steps", "1", "--max-new-tokens", "6", "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random gpt-micro checkpoint (context 256, enough for the Alpaca preamble) with a byte-level tokenizer."""
    from llmscratch.checkpoint import save_model
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT
    from llmscratch.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["bytes"], 257, progress=False)  # 256 bytes + <|endoftext|>
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size, context_length=256))
    return save_model(tmp_path_factory.mktemp("base") / "micro", model, tok, {"model": "gpt-micro"})


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_finetune_generate_and_eval_tasks_end_to_end(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS * 5)  # 20 records → 17 train / 1 val / 2 test
    out = tmp_path / "tuned"
    code, stdout, err = run(["finetune", "instruct", base, "--data", data, "--out", out, "--prompt-style", "phi3",
                             *FAST], capsys)
    assert code == 0, err
    assert "train 17 / val 1 / test 2" in stdout and "stopped at step 4" in stdout
    assert json.loads((out / "prompt_style.json").read_text()) == {"prompt_style": "phi3"}
    assert yaml.safe_load((out / "hyperparameters.yaml").read_text())["prompt_style"] == "phi3"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "metrics.csv"):
        assert (out / name).is_file(), name
    responses = json.loads((out / "test_responses.json").read_text())
    assert len(responses) == 2
    assert all(set(r) >= {"instruction", "input", "output", "family", "model_response"} for r in responses)

    # generate wraps --prompt in the saved style and prints only the answer; --raw continues the text as is
    ask = ["generate", out, "--temperature", 0, "--max-new-tokens", 10]
    code, styled, err = run([*ask, "--prompt", "Say hi."], capsys)
    assert code == 0, err
    wrapped = "<|user|>\nSay hi.<|end|>\n<|assistant|>\n"
    stops = [x for s in ("<|end|>", "<|user|>", "<|assistant|>") for x in ("--stop", s)]
    code, raw, err = run([*ask, "--prompt", wrapped, "--raw", *stops], capsys)
    assert code == 0, err
    assert raw.startswith(wrapped) and not styled.startswith("<|user|>")
    assert raw[len(wrapped):].strip() == styled.strip()

    code, stdout, err = run(["eval", "tasks", out, data, "--json", tmp_path / "scores.json", "--max-new-tokens", 6,
                             "--no-progress"], capsys)
    assert code == 0, err
    assert "prompt style phi3" in stdout and "overall" in stdout and "words" in stdout
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["overall"]["n"] == 20 and set(scores["families"]) == {"words", "sums"}


def test_a_tiny_model_learns_the_answers_exactly(base, tmp_path, capsys):
    """Masking, eos and the prompt style line up: after tuning, greedy answers equal the outputs."""
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    out = tmp_path / "tuned"
    code, _, err = run(["finetune", "instruct", base, "--data", data, "--out", out, "--prompt-style", "phi3",
                        "--val-fraction", 0, "--test-fraction", 0, "--epochs", 0, "--train.max_steps", STEPS,
                        "--train.batch_size", 4, "--train.lr", 3e-3, "--train.warmup_steps", 5,
                        "--train.eval_every", STEPS, "--train.eval_batches", 1, "--train.weight_decay", 0,
                        "--no-progress"], capsys)
    assert code == 0, err
    assert not (out / "test_responses.json").exists()  # no test split asked for
    code, stdout, err = run(["eval", "tasks", out, data, "--max-new-tokens", 12, "--no-progress"], capsys)
    assert code == 0, err
    assert stdout.splitlines()[-1].split() == ["overall", "4", "4", "100.0%"], stdout


def test_before_tuning_eval_tasks_needs_a_style(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    code, stdout, err = run(["eval", "tasks", base, data, "--prompt-style", "alpaca", "--max-new-tokens", 4,
                             "--no-progress"], capsys)
    assert code == 0, err
    assert "prompt style alpaca" in stdout and "note:" not in stdout
    code, stdout, err = run(["eval", "tasks", base, data, "--max-new-tokens", 4, "--no-progress"], capsys)
    assert code == 0 and "no saved prompt style" in stdout


def test_messages_data_and_resume(base, tmp_path, capsys):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                         {"role": "assistant", "content": "6"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [conv] * 6)  # 12 records
    out = tmp_path / "tuned"
    code, stdout, err = run(["finetune", "instruct", base, "--data", data, "--out", out, "--train.save_every", 2,
                             *FAST], capsys)
    assert code == 0, err
    assert "12 records" in stdout
    code, stdout, err = run(["finetune", "instruct", base, "--data", data, "--out", out, "--resume",
                             *FAST[:2], "--train.max_steps", 6, *FAST[4:]], capsys)
    assert code == 0, err
    assert "stopped at step 6" in stdout


@pytest.mark.parametrize("content,args,needle", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": \n', [], "data.jsonl:2: not valid JSON"),
    ('{"instruction": "a"}\n', [], "data.jsonl:1: missing key 'output'"),
    ('{"instruction": "", "output": "b"}\n', [], "data.jsonl:1: empty 'instruction'"),
    (None, ["--max-length", 999], "--max-length 999 exceeds the model's context length 256"),
    (None, ["--prompt-style", "chatml"], "unknown prompt style 'chatml'"),
    (None, ["--resume"], "--resume: no checkpoint"),
    (None, ["--epochs", "-1"], "--epochs -1: out of range; allowed: >= 0"),
    (None, ["--train.batch_size", 64], "fewer than one batch of 64"),
])
def test_bad_input_exits_2_with_one_line(base, tmp_path, capsys, content, args, needle):
    data = tmp_path / "data.jsonl"
    if content is None:
        write_jsonl(data, RECORDS * 5)
    else:
        data.write_text(content)
    code, _, err = run(["finetune", "instruct", base, "--data", data, "--out", tmp_path / "o", *FAST, *args],
                       capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert needle in err, err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_refuses_to_overwrite_a_run(base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS * 5)
    out = tmp_path / "tuned"
    assert run(["finetune", "instruct", base, "--data", data, "--out", out, *FAST], capsys)[0] == 0
    code, _, err = run(["finetune", "instruct", base, "--data", data, "--out", out, *FAST], capsys)
    assert code == 2 and "already holds a training run" in err


def test_synth_instruct_cli(tmp_path, capsys):
    code, stdout, err = run(["data", "synth-instruct", "--out", tmp_path / "synth", "--n-train", 10, "--n-test", 4,
                             "--families", "spelling,sorting"], capsys)
    assert code == 0, err
    train = [json.loads(line) for line in (tmp_path / "synth" / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (tmp_path / "synth" / "test.jsonl").read_text().splitlines()]
    assert len(train) == 20 and len(test) == 8 and {r["family"] for r in test} == {"spelling", "sorting"}
    code, _, err = run(["data", "synth-instruct", "--out", tmp_path / "s2", "--families", "poetry"], capsys)
    assert code == 2 and "--families poetry: unknown task family" in err
