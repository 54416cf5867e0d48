"""Parity with `transformers`: tiny random Gemma3ForCausalLM models (windows shorter than the prompt, the 5:1
local:global pattern, GQA and MHA, a softmax scale of their own, tied and untied) saved by transformers → our
converter → equal logits (fp32, 1e-5), equal greedy tokens cached and uncached; our export → transformers reload
→ equal logits again; and the CLI with the folder's own tokenizer.json and chat template."""

import json

import pytest
import torch
from clitools import run as _cli

transformers = pytest.importorskip("transformers")

from parity import assert_same_as_transformers  # noqa: E402

from llmscratch.errors import UserError  # noqa: E402
from llmscratch.weights.hf_gemma3 import export_hf_gemma3, load_hf_gemma3  # noqa: E402

CASES = {  # each: a window shorter than the 40-token prompt
    "gqa-5to1-window5-scaled": dict(num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                    sliding_window=5, query_pre_attn_scalar=24),
    "mqa-7layers-window3-untied": dict(num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=1,
                                       sliding_window=3, tie_word_embeddings=False),
    "mha-explicit-types-window9": dict(num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                                       head_dim=32, sliding_window=9, query_pre_attn_scalar=32,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                                    "sliding_attention"],
                                       rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                                                        "sliding_attention": {"rope_type": "default",
                                                                              "rope_theta": 500.0}}),
}


def hf_model(kw: dict, vocab: int = 211, seed: int = 0):
    kw = {"head_dim": 16, **kw}
    cfg = transformers.Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96,
                                        max_position_embeddings=128, attn_implementation="eager", **kw)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms (their zero init means a weight of 1), so none can hide a mis-mapping
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_greedy_and_round_trip_equal_transformers(tmp_path, case):
    kw = CASES[case]
    hf = hf_model(kw)
    hf.save_pretrained(tmp_path / "hf")
    ours, cfg = load_hf_gemma3(tmp_path / "hf")
    assert cfg.sliding_window == kw["sliding_window"] and cfg.n_kv_heads == kw["num_key_value_heads"]
    assert [t == "full" for t in cfg.layer_types] == [t == "full_attention" for t in hf.config.layer_types]
    ids = torch.randint(0, 211, (2, 40), generator=torch.Generator().manual_seed(1))
    assert_same_as_transformers(ours, hf, ids, prompt_len=7, new_tokens=20)

    export_hf_gemma3(ours, tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert type(again) is type(hf) and again.config.layer_types == hf.config.layer_types
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_older_config_with_only_a_window_pattern_converts(tmp_path):
    hf = hf_model(dict(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=1, sliding_window=4))
    hf.save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    raw = json.loads(cfg_file.read_text())
    for key in ("layer_types", "_sliding_window_pattern", "rope_parameters"):
        raw.pop(key, None)
    raw.update(sliding_window_pattern=2, rope_theta=1e6, rope_local_base_freq=10000.0)  # Gemma 3's first releases
    cfg_file.write_text(json.dumps(raw))
    ours, cfg = load_hf_gemma3(tmp_path)
    assert cfg.layer_types == ["sliding", "full", "sliding", "full", "sliding"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 211, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reloaded(ids).logits, atol=1e-5, rtol=1e-5)


def test_bf16_conversion_keeps_logits_close(tmp_path):
    hf = hf_model(CASES["gqa-5to1-window5-scaled"])
    hf.save_pretrained(tmp_path)
    ours, _ = load_hf_gemma3(tmp_path, dtype=torch.bfloat16)
    assert ours.norm.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 211, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).float(), hf(ids).logits, atol=0.1, rtol=0.05)


def test_unsupported_settings_and_bad_shapes_are_user_errors(tmp_path):
    hf_model(dict(num_hidden_layers=2, final_logit_softcapping=30.0)).save_pretrained(tmp_path / "cap")
    with pytest.raises(UserError, match="final_logit_softcapping"):
        load_hf_gemma3(tmp_path / "cap")
    hf_model(dict(num_hidden_layers=2)).save_pretrained(tmp_path / "ok")
    raw = json.loads((tmp_path / "ok" / "config.json").read_text())
    raw["rope_parameters"]["full_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    (tmp_path / "ok" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="rope type 'linear'"):
        load_hf_gemma3(tmp_path / "ok")
    raw["rope_parameters"]["full_attention"] = {"rope_type": "default", "rope_theta": 1e6}
    raw["intermediate_size"] = 80
    (tmp_path / "ok" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"shape mismatch.*mlp\.(down|gate|up)_proj\.weight is"):
        load_hf_gemma3(tmp_path / "ok")
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT

    with pytest.raises(UserError, match="lacks: mlp=geglu"):
        export_hf_gemma3(GPT(ModelConfig.from_preset("gemma3-micro", mlp="swiglu")), tmp_path / "no")


def test_cli_convert_takes_the_folders_own_tokenizer_and_chat_template(tmp_path, tiny_corpus, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([tiny_corpus.read_text()], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = hf_model(CASES["gqa-5to1-window5-scaled"], vocab=tok.get_vocab_size())
    hf.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
                "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}")  # Gemma's turn markers
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<end_of_turn>", "tokenizer_class": "PreTrainedTokenizerFast",
         "chat_template": template}))
    capsys.readouterr()
    code, _, err = _cli(["convert", "from-hf", tmp_path / "hf", tmp_path / "ours"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert saved["sliding_window"] == 5 and saved["post_norms"] and saved["mlp"] == "geglu"
    code, out, err = _cli(["generate", tmp_path / "ours", "--prompt", "The module", "--max-new-tokens", 12,
                           "--temperature", 0, "--dtype", "fp32"], capsys)
    assert code == 0 and out.startswith("The module"), err
    code, out, err = _cli(["generate", tmp_path / "ours", "--chat", "--prompt", "hi", "--max-new-tokens", 4,
                           "--temperature", 0, "--dtype", "fp32"], capsys)
    assert code == 0 and "<end_of_turn>" not in out, err
    code, out, err = _cli(["convert", "to-hf", tmp_path / "ours", tmp_path / "back"], capsys)
    assert code == 0 and "Gemma3ForCausalLM" in out and "tokenizer" in out, err
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    msgs = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(msgs, tokenize=False) == "<bos><start_of_turn>user\nhi<end_of_turn>\n"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    ids = torch.tensor([tok.encode("The module of the cat").ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
