"""Hugging Face tokenizer folders (Llama 3 / Qwen3 style): ids and chat templates equal `transformers`'."""

import json

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from llmscratch.errors import UserError  # noqa: E402
from llmscratch.tokenizer import HFTokenizer, load_tokenizer  # noqa: E402

# A Llama-3-shaped template (header tokens, <|eot_id|>), written for this test.
LLAMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# A Qwen-shaped template (ChatML) with block tags whose whitespace trim_blocks/lstrip_blocks must remove.
CHATML = """{% for message in messages %}
    {% if message['role'] == 'system' %}
<|im_start|>system
{{ message['content'] }}<|im_end|>
    {% else %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


@pytest.fixture(params=["llama", "chatml"])
def hf_folder(request, tmp_path, tiny_corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
                if request.param == "llama" else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator([tiny_corpus.read_text()], trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / request.param
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    if request.param == "llama":
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA_STYLE}
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    else:
        config = {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML}
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a module.  "},
            {"role": "assistant", "content": "The os module."}, {"role": "user", "content": "Another?"}]


def test_ids_chat_template_and_stop_tokens_equal_transformers(hf_folder, tmp_path):
    ours = load_tokenizer(hf_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_folder)
    assert isinstance(ours, HFTokenizer)
    text = "The module's function returns a value; <|eot_id|> ünïcode 123"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == text
    for gen in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == theirs.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=gen)
    eos = "<|eot_id|>" if hf_folder.name == "llama" else "<|im_end|>"
    assert ours.eos_id == theirs.convert_tokens_to_ids(eos)
    if hf_folder.name == "llama":
        assert ours.stop_ids == [4, 1]  # eos first, then generation_config's others
    ours.save(tmp_path / "copy")  # a checkpoint folder carries the files; loading them gives the same tokenizer
    again = load_tokenizer(tmp_path / "copy")
    assert again.encode(text) == ours.encode(text) and again.chat_template == ours.chat_template


def test_bad_files_are_user_errors(hf_folder):
    ours = load_tokenizer(hf_folder)
    with pytest.raises(UserError, match="outside"):
        ours.decode([10**6])
    (hf_folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ raise_exception('no') }}"}))
    with pytest.raises(UserError, match="chat template: no"):
        load_tokenizer(hf_folder).apply_chat_template(MESSAGES)
    (hf_folder / "tokenizer.json").write_text('{"model": {"type": "BPE"}, "broken": ')
    with pytest.raises(UserError, match="tokenizer.json: cannot read"):
        load_tokenizer(hf_folder)


def test_a_prompt_starts_as_the_tokenizer_json_says_and_training_examples_too(tmp_path):
    """A model whose tokenizer.json adds a BOS before every input (Gemma, Llama 3) gets it before a prompt it
    continues (`encode_prompt`, as transformers' tokenizer(text) does) and before each instruction example it is
    tuned on; `encode` (a rendered chat, which writes its own BOS) adds nothing. Without such a post-processor
    (Qwen3, ours) the two agree."""
    from llmscratch.data.instruct import encode_records
    from llmscratch.prompts import get_style

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(["hello world, the answer is blue"] * 5, tokenizers.trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<bos>", "<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    for with_bos in (False, True):
        folder = tmp_path / f"bos-{with_bos}"
        folder.mkdir()
        if with_bos:
            tok.post_processor = tokenizers.processors.TemplateProcessing(single="<bos> $A", special_tokens=[
                ("<bos>", 0)])
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<|endoftext|>"}))
        hf = HFTokenizer(folder)
        plain = hf.encode("hello world")
        assert hf.encode_prompt("hello world") == ([0] if with_bos else []) + plain
        examples, _ = encode_records([{"instruction": "Say hello.", "input": "", "output": "hello"}], hf,
                                     get_style("alpaca"), 512)
        assert (examples[0].ids[0] == 0) == with_bos
