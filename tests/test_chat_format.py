"""Chat formats: OpenAI-style messages -> prompt text and stop strings, for a saved prompt style, a tokenizer's
chat template and the plain User:/Assistant: default; and the checks an API makes of `messages`."""

import json

import pytest

from llmscratch.errors import UserError
from llmscratch.prompts import ChatPrompt, chat_format, get_style

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]

# A Qwen3-shaped template, written for this test: ChatML turns, and with `enable_thinking` false an empty
# <think></think> block opens the answer (so the model skips its reasoning).
THINKING_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")


def _hf_folder(folder, corpus, template):
    """A tiny Hugging Face tokenizer folder (tokenizer.json trained on `corpus`), with `template` as its chat template
    when given; <|im_end|> and <|endoftext|> end a reply."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([corpus], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return folder


@pytest.fixture
def template_folder(tmp_path, tiny_corpus):
    return _hf_folder(tmp_path / "qwen", tiny_corpus.read_text(), THINKING_CHATML)


def test_plain_format_without_and_with_a_system_message():
    fmt = chat_format(None, None)
    assert fmt.kind == "plain" and fmt.describe() == "plain User:/Assistant: format"
    assert fmt.render([{"role": "user", "content": "hi"}]) == ChatPrompt("User: hi\nAssistant:", ("\nUser:",))
    assert fmt.render(CONVERSATION).text == "Be brief.\n\nUser: 2+2?\nAssistant: 4\nUser: And 3+3?\nAssistant:"


def test_plain_format_joins_messages_in_a_row_and_every_system_message():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "user", "content": "Quick!"}, {"role": "assistant", "content": "4"},
                {"role": "system", "content": "Use digits."}, {"role": "user", "content": "3+3?"}]
    assert chat_format(None, None).render(messages).text == (
        "Be brief.\n\nUse digits.\n\nUser: 2+2?\nQuick!\nAssistant: 4\nUser: 3+3?\nAssistant:")


@pytest.mark.parametrize("name, text", [
    ("alpaca", "Be brief.\n\n### Instruction:\n2+2?\n\n### Response:\n4\n\n### Instruction:\nAnd 3+3?\n\n"
               "### Response:\n"),
    ("phi3", "<|system|>\nBe brief.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n"
             "<|user|>\nAnd 3+3?<|end|>\n<|assistant|>\n"),
])
def test_a_saved_style_renders_system_and_history_as_its_records_do(name, text):
    style = get_style(name)
    fmt = chat_format(None, style)
    assert fmt.kind == "style" and fmt.describe() == f"prompt style {name}"
    assert fmt.render(CONVERSATION) == ChatPrompt(text, style.stop)
    # without a system message, alpaca falls back to the book's preamble and phi3 writes no system turn
    assert fmt.render(CONVERSATION[1:]).text == style.prompt(
        {"instruction": "And 3+3?", "input": "", "history": [["2+2?", "4"]]})


def test_the_tokenizers_template_equals_transformers_and_passes_enable_thinking(template_folder):
    transformers = pytest.importorskip("transformers")
    from llmscratch.tokenizer import load_tokenizer

    tok = load_tokenizer(template_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(template_folder)
    fmt = chat_format(tok, None)
    assert fmt.kind == "template" and fmt.describe() == "the tokenizer's chat template"
    for thinking in (None, False, True):
        extra = {} if thinking is None else {"enable_thinking": thinking}
        prompt = fmt.render(CONVERSATION, thinking=thinking)
        assert prompt.text == theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True,
                                                         **extra)
        assert prompt.stop == ("<|im_end|>", "<|endoftext|>")  # eos, then generation_config's other stop id
    assert fmt.render(CONVERSATION, thinking=False).text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "<think>" not in fmt.render(CONVERSATION).text
    assert fmt.render([{"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text",
                                                                                      "text": "there"}]}]).text == (
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n")


def test_precedence_style_then_template_then_plain(template_folder, tmp_path, tiny_corpus):
    from llmscratch.tokenizer import load_tokenizer

    with_template = load_tokenizer(template_folder)
    # a Qwen-shaped model fine-tuned in alpaca answers best in alpaca
    assert chat_format(with_template, get_style("alpaca")).kind == "style"
    assert chat_format(with_template, None).kind == "template"
    without = load_tokenizer(_hf_folder(tmp_path / "bare", tiny_corpus.read_text(), None))
    assert chat_format(without, None).kind == "plain"


@pytest.mark.parametrize("messages, needle", [
    ([], "messages must be a non-empty list"),
    ({"role": "user", "content": "hi"}, "messages must be a non-empty list"),
    (["hi"], "messages[0] must be an object with 'role' and 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "tool", "content": "c"}],
     "messages[2].role must be one of system, user, assistant (or developer), got 'tool'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
     "messages[1]: the last message must be from the user, got assistant"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     "messages[0].content[0]: part type 'image_url' is not supported"),
    ([{"role": "user", "content": None}], "messages[0].content must be a string or a list of text parts"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}],
     "messages[1]: the conversation must start with a user message"),
])
def test_malformed_messages_are_one_line_user_errors(messages, needle):
    for fmt in (chat_format(None, None), chat_format(None, get_style("phi3"))):
        with pytest.raises(UserError) as info:
            fmt.render(messages)
        assert needle in str(info.value) and "\n" not in str(info.value)


def test_a_developer_message_is_a_system_message():
    """OpenAI's newer clients send the system prompt with role "developer"."""
    fmt = chat_format(None, None)
    said = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert fmt.render(said) == fmt.render([{**said[0], "role": "system"}, said[1]])
    assert fmt.render(said).text.startswith("Be brief.\n\n")


def test_a_template_gets_the_turns_as_they_are(template_folder):
    """Only the style and plain formats need alternating turns; a chat template gets an assistant turn first (and
    the system messages joined, first)."""
    from llmscratch.tokenizer import load_tokenizer

    messages = [{"role": "assistant", "content": "Hello!"}, {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"}]
    assert chat_format(load_tokenizer(template_folder), None).render(messages).text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
