"""The check every Hugging Face conversion test makes: our converted model against the transformers model it came
from, on the same token ids."""

import torch

from llmscratch.generate import generate_ids


def assert_same_as_transformers(ours, hf, ids: torch.Tensor, prompt_len: int = 7, new_tokens: int = 20) -> None:
    """Equal logits on `ids` (1e-5, fp32), and the same greedy continuation of its first `prompt_len` tokens for
    `new_tokens` tokens — ours with and without the KV cache against transformers' `generate`."""
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    prompt = ids[:, :prompt_len]
    hf_tokens = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                            do_sample=False, eos_token_id=None, pad_token_id=0)[:, prompt_len:]
    cached = torch.stack(list(generate_ids(ours, prompt, new_tokens)), 1)
    uncached = torch.stack(list(generate_ids(ours, prompt, new_tokens, use_cache=False)), 1)
    assert torch.equal(cached, hf_tokens) and torch.equal(uncached, hf_tokens)
