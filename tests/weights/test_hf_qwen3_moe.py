"""Parity with `transformers`' Qwen3MoeForCausalLM: tiny random models in several shapes (odd expert counts, top-k
1 and 2, renormalised or raw router weights, tied and untied) saved by transformers → our converter → equal logits
(fp32, 1e-5) and greedy tokens, cached == uncached; our export → transformers reload → equal logits; the fused
in-memory expert layout reads the same; configs we cannot represent are one-line errors."""

import json

import pytest
import torch
from clitools import assert_hf_cli_round_trip

transformers = pytest.importorskip("transformers")

from parity import assert_same_as_transformers  # noqa: E402

from llmscratch.errors import UserError  # noqa: E402
from llmscratch.weights.hf_llama import export_hf_llama, load_hf_llama  # noqa: E402

CASES = {
    "3-experts-top1-raw-untied": dict(num_experts=3, num_experts_per_tok=1, norm_topk_prob=False),
    "5-experts-top2-normalised-tied": dict(num_experts=5, num_experts_per_tok=2, norm_topk_prob=True,
                                           tie_word_embeddings=True, num_key_value_heads=4),
    "7-experts-top2-raw-gqa4": dict(num_experts=7, num_experts_per_tok=2, norm_topk_prob=False,
                                    num_attention_heads=8, num_key_value_heads=2, head_dim=16),
}


def hf_moe(seed=0, vocab_size=211, n_layers=3, **kw):
    """A random Qwen3MoeForCausalLM (eval mode) with random norms and a router spread enough that the tokens
    go to different experts."""
    args = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, moe_intermediate_size=32,
                max_position_embeddings=128, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**args, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_greedy_and_round_trip_equal_transformers(tmp_path, case):
    kw = CASES[case]
    hf = hf_moe(**kw)
    hf.save_pretrained(tmp_path / "hf")
    ours, cfg = load_hf_llama(tmp_path / "hf")
    assert (cfg.n_experts, cfg.n_experts_per_token, cfg.moe_d_ff, cfg.moe_normalize_topk, cfg.qk_norm) == (
        kw["num_experts"], kw["num_experts_per_tok"], 32, kw["norm_topk_prob"], True)
    ids = torch.randint(0, 211, (2, 60), generator=torch.Generator().manual_seed(1))
    assert_same_as_transformers(ours, hf, ids, prompt_len=7, new_tokens=16)

    export_hf_llama(ours, tmp_path / "back")
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["model_type"] == "qwen3_moe" and exported["num_experts"] == kw["num_experts"]
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(again) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_fused_expert_tensors_read_the_same(tmp_path):
    """transformers 5 holds the experts as 3-D tensors (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`)
    and save_pretrained splits them per expert; a folder written straight from the state dict keeps them fused."""
    from safetensors.torch import save_file

    hf = hf_moe(**CASES["7-experts-top2-raw-gqa4"])
    hf.save_pretrained(tmp_path / "hf")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file(state, str(fused / "model.safetensors"))
    ours, _ = load_hf_llama(fused)
    ids = torch.randint(0, 211, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, needle", [
    ({"mlp_only_layers": [1]}, "mlp_only_layers"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
    ({"use_sliding_window": True}, "use_sliding_window"),
])
def test_unsupported_layouts_are_one_line_user_errors(tmp_path, change, needle):
    hf_moe(num_experts=3, num_experts_per_tok=1, n_layers=2).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(UserError, match=needle) as err:
        load_hf_llama(tmp_path)
    assert "\n" not in str(err.value)


def test_a_shared_expert_does_not_export(tmp_path):
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT

    model = GPT(ModelConfig.from_preset("qwen3-moe-micro", shared_expert_d_ff=16))
    with pytest.raises(UserError, match="shared_expert_d_ff=16"):
        export_hf_llama(model, tmp_path / "out")


def test_cli_convert_generate_and_back(tmp_path, prepared, capsys):
    from llmscratch.tokenizer import load_tokenizer

    vocab = load_tokenizer(prepared).vocab_size
    theirs = hf_moe(vocab_size=vocab, n_layers=2, **CASES["5-experts-top2-normalised-tied"])
    theirs.save_pretrained(tmp_path / "hf")
    assert_hf_cli_round_trip(theirs, tmp_path, prepared, capsys, n_tokens=20)
