"""Meta's tiktoken-format tokenizer.model: our reader gives the ids transformers' own tiktoken converter gives."""

import base64

import pytest

from llmscratch.errors import UserError
from llmscratch.tokenizer.llama3 import LLAMA3_PATTERN, llama3_tokenizer


@pytest.fixture
def model_file(tmp_path, prepared):
    from llmscratch.tokenizer import load_tokenizer

    ranks = load_tokenizer(prepared).ranks  # a byte-level BPE trained on the tiny corpus
    path = tmp_path / "original" / "tokenizer.model"
    path.parent.mkdir()
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(),
                                                                                        key=lambda x: x[1])))
    return path, ranks


def test_ids_equal_transformers_tiktoken_converter(model_file, tmp_path):
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    path, ranks = model_file
    ours = llama3_tokenizer(tmp_path)  # finds original/tokenizer.model
    specials = {"<|begin_of_text|>": len(ranks), "<|eot_id|>": len(ranks) + 9}
    assert all(ours.special_tokens[k] == v for k, v in specials.items())
    assert ours.vocab_size == len(ranks) + 256
    theirs = convert.TikTokenConverter(vocab_file=str(path), pattern=LLAMA3_PATTERN,
                                       extra_special_tokens=list(ours.special_tokens)).converted()
    text = "The module's I'VE 12345 digits,\n\n  spaces\tand ünïcode <|eot_id|>!"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids
    assert ours.decode(ours.encode(text)) == text


def test_malformed_file_names_the_line(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("QQ== 0\nnot-base64!! 1\n")
    with pytest.raises(UserError, match="line 2"):
        llama3_tokenizer(bad)
    with pytest.raises(UserError, match="no tokenizer.model"):
        llama3_tokenizer(tmp_path / "original" if (tmp_path / "original").mkdir() is None else tmp_path)
