"""Parity with `transformers`: tiny random Llama (GQA 4:1 and 2:1, llama3 rope scaling, tied and untied) and
Qwen3 models saved by transformers → our converter → equal logits (fp32, 1e-5), equal greedy tokens, cached ==
uncached; and our export → transformers reload → equal logits again."""

import pytest
import torch
from clitools import assert_hf_cli_round_trip
from clitools import run as _cli

transformers = pytest.importorskip("transformers")

from parity import assert_same_as_transformers  # noqa: E402

from llmscratch.errors import UserError  # noqa: E402
from llmscratch.weights.hf_llama import export_hf_llama, load_hf_llama  # noqa: E402

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}
CASES = {
    "llama-gqa4-llama3rope-tied": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                                                 rope_scaling=LLAMA3_SCALING, rope_theta=500000.0)),
    "llama-gqa2-untied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "qwen3-wide-heads-tied": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                            tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3-untied": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)),
}


def hf_model(family, kw, seed=0):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    cfg = cls[0](vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                 max_position_embeddings=128, **kw)
    torch.manual_seed(seed)
    model = cls[1](cfg).eval()
    with torch.no_grad():  # random norms too, so a mis-mapped norm weight cannot hide behind its init of ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_greedy_and_round_trip_equal_transformers(tmp_path, case):
    family, kw = CASES[case]
    hf = hf_model(family, kw)
    hf.save_pretrained(tmp_path / "hf")
    ours, cfg = load_hf_llama(tmp_path / "hf")
    assert cfg.n_kv_heads == kw["num_key_value_heads"] and cfg.qk_norm == (family == "qwen3")
    ids = torch.randint(0, 211, (2, 100), generator=torch.Generator().manual_seed(1))  # past the 32 of llama3
    assert_same_as_transformers(ours, hf, ids, prompt_len=7, new_tokens=20)

    export_hf_llama(ours, tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_sharded_folder_and_bad_shapes(tmp_path):
    hf = hf_model("llama", CASES["llama-gqa2-untied"][1])
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours, _ = load_hf_llama(tmp_path / "sharded")
    ids = torch.randint(0, 211, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)

    import json
    bad = tmp_path / "sharded" / "config.json"
    cfg = json.loads(bad.read_text())
    cfg["intermediate_size"] = 80
    bad.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"shape mismatch.*mlp\.(down|gate|up)_proj\.weight is \(\d+, \d+\), expected"):
        load_hf_llama(tmp_path / "sharded")


def test_unknown_family_and_biases_are_user_errors(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mistral"}')
    with pytest.raises(UserError, match="model_type 'mistral'"):
        load_hf_llama(tmp_path)
    hf_model("llama", dict(num_attention_heads=4, attention_bias=True)).save_pretrained(tmp_path / "b")
    with pytest.raises(UserError, match="biases"):
        load_hf_llama(tmp_path / "b")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cli_convert_generate_and_back(tmp_path, prepared, capsys, family):
    from llmscratch.tokenizer import load_tokenizer

    vocab = load_tokenizer(prepared).vocab_size
    kw = dict(CASES["llama-gqa4-llama3rope-tied" if family == "llama" else "qwen3-untied"][1])
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    torch.manual_seed(0)
    theirs = cls[1](cls[0](vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           max_position_embeddings=64, **kw)).eval()
    theirs.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    code, _, err = _cli(["convert", "from-hf", tmp_path / "hf", tmp_path / "no-tok"], capsys)
    assert code == 2 and "no tokenizer.json or tokenizer.model" in err and not (tmp_path / "no-tok").exists()
    assert_hf_cli_round_trip(theirs, tmp_path, prepared, capsys, n_tokens=20)


def test_cli_convert_takes_the_folders_own_tokenizer_and_chat_template(tmp_path, tiny_corpus, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([tiny_corpus.read_text()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = hf_model("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    hf.resize_token_embeddings(tok.get_vocab_size())
    hf.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (tmp_path / "hf" / "tokenizer_config.json").write_text(
        '{"eos_token": "<|im_end|>", "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": %s}'
        % __import__("json").dumps(template))
    capsys.readouterr()
    code, _, err = _cli(["convert", "from-hf", tmp_path / "hf", tmp_path / "ours"], capsys)
    assert code == 0, err
    code, out, err = _cli(["generate", tmp_path / "ours", "--prompt", "The", "--max-new-tokens", 4,
                           "--temperature", 0, "--dtype", "fp32"], capsys)
    assert code == 0 and out.startswith("The"), err
    code, out, err = _cli(["convert", "to-hf", tmp_path / "ours", tmp_path / "back"], capsys)
    assert code == 0 and "tokenizer" in out, err
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    msgs = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"
    assert again.encode("The module", add_special_tokens=False) == tok.encode("The module").ids

    # Chat through the model's own template; then the downstream stages run on this Qwen3-shaped model too.
    code, out, err = _cli(["generate", tmp_path / "ours", "--chat", "--system", "Be brief.", "--prompt", "hi",
                           "--max-new-tokens", 4, "--temperature", 0, "--dtype", "fp32"], capsys)
    assert code == 0 and "<|im_end|>" not in out, err
    records = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("yes", "no", "maybe", "ok") * 5]
    (tmp_path / "data.json").write_text(__import__("json").dumps(records))
    code, out, err = _cli(["finetune", "instruct", tmp_path / "ours", "--data", tmp_path / "data.json", "--out",
                           tmp_path / "tuned", "--train.max_steps", 2, "--train.batch_size", 2,
                           "--max-new-tokens", 3, "--no-progress", "--lora-rank", 2], capsys)
    assert code == 0, err
    code, out, err = _cli(["generate", tmp_path / "tuned", "--prompt", "Say yes.", "--max-new-tokens", 3,
                           "--temperature", 0, "--dtype", "fp32"], capsys)
    assert code == 0, err


def test_chat_without_a_template_is_a_user_error(tmp_path, prepared, capsys):
    from llmscratch.checkpoint import save_model
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT
    from llmscratch.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared)
    save_model(tmp_path / "m", GPT(ModelConfig.from_preset("llama-micro", vocab_size=tok.vocab_size)), tok)
    code, _, err = _cli(["generate", tmp_path / "m", "--chat", "--prompt", "hi", "--max-new-tokens", 8], capsys)
    assert code == 2 and "chat template" in err
