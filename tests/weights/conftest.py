"""Tiny random GPT-2s from transformers, shared by the weight-format tests."""

from pathlib import Path

import pytest
import torch


def make_hf_gpt2(tmp_path: Path, seed: int = 0, **kw):
    """A random `transformers.GPT2LMHeadModel` (eval mode, no dropout) saved to tmp_path/hf and returned."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**kw, bos_token_id=kw["vocab_size"] - 1, eos_token_id=kw["vocab_size"] - 1,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random LayerNorm and bias values, so a swapped or missing tensor cannot hide
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5).add_(1.0 if name.endswith("weight") else 0.0)
    model.save_pretrained(tmp_path / "hf")
    return model


@pytest.fixture(scope="session")
def hf_gpt2():
    """`make_hf_gpt2(tmp_path, seed=0, **GPT2Config fields)`."""
    pytest.importorskip("transformers", reason="transformers is a test dependency for parity")
    return make_hf_gpt2
