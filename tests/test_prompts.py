"""Prompt styles: exact text, chat history, the saved style file and its lookup from step folders."""

import json

import pytest

from llmscratch.errors import UserError
from llmscratch.prompts import get_style, load_style, save_style
from llmscratch.runs import PROMPT_STYLE as STYLE_FILE

RECORD = {"instruction": "Rewrite the sentence.", "input": "The cake was baked by me.", "output": "I baked the cake."}


def test_alpaca_is_the_books_text():
    prompt, response = get_style("alpaca").format(RECORD)
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cake was baked by me."
        "\n\n### Response:\n")
    assert response == "I baked the cake."


def test_alpaca_without_input_has_no_input_block():
    prompt = get_style("alpaca").prompt({**RECORD, "input": ""})
    assert "### Input:" not in prompt
    assert prompt.endswith("completes the request.\n\n### Instruction:\nRewrite the sentence.\n\n### Response:\n")


def test_phi3_turns():
    style = get_style("phi3")
    prompt, response = style.format(RECORD)
    assert prompt == "<|user|>\nRewrite the sentence.\nThe cake was baked by me.<|end|>\n<|assistant|>\n"
    assert response == "I baked the cake.<|end|>"
    assert style.prompt({**RECORD, "input": ""}) == "<|user|>\nRewrite the sentence.<|end|>\n<|assistant|>\n"
    assert "<|end|>" in style.stop


def test_history_and_system_render_before_the_current_turn():
    record = {"instruction": "And 3+3?", "input": "", "output": "6", "system": "Be brief.",
              "history": [["2+2?", "4"]]}
    assert get_style("phi3").prompt(record) == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n"
        "<|user|>\nAnd 3+3?<|end|>\n<|assistant|>\n")
    assert get_style("alpaca").prompt(record) == (
        "Be brief.\n\n### Instruction:\n2+2?\n\n### Response:\n4\n\n### Instruction:\nAnd 3+3?\n\n### Response:\n")


def test_wrap_and_clean():
    style = get_style("phi3")
    assert style.wrap("Hi") == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert style.clean(" Hello there.<|end|>\n<|user|>") == "Hello there."
    assert get_style("alpaca").clean("Paris\n\n### Instruction:\nmore") == "Paris"
    assert style.clean("blue<|en") == "blue"  # the token limit cut the end-of-turn marker short
    assert style.clean("a < b") == "a < b"


def test_unknown_style():
    with pytest.raises(UserError, match="unknown prompt style 'chatml'.*alpaca, phi3"):
        get_style("chatml")


def test_style_file_round_trip_and_step_folder_lookup(tmp_path):
    assert load_style(tmp_path) is None  # a base model has none
    save_style(tmp_path, "phi3")
    assert json.loads((tmp_path / STYLE_FILE).read_text()) == {"prompt_style": "phi3"}
    assert load_style(tmp_path).name == "phi3"
    step = tmp_path / "checkpoints" / "step-0000010"
    step.mkdir(parents=True)
    assert load_style(step).name == "phi3"  # a step folder takes its run's style


def test_bad_style_file(tmp_path):
    (tmp_path / STYLE_FILE).write_text('{"prompt_style": "nope"}')
    with pytest.raises(UserError, match="prompt_style must be one of"):
        load_style(tmp_path)
    (tmp_path / STYLE_FILE).write_text("{oops")
    with pytest.raises(UserError, match="not valid JSON"):
        load_style(tmp_path)
