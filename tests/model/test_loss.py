"""The chunked fused LM-head loss equals the plain logits + cross-entropy, in value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from llmscratch.config import ModelConfig
from llmscratch.model import GPT
from llmscratch.model.loss import lm_head_cross_entropy, lm_head_cross_entropy_reference


def _grads(fn, h, w, y):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(h, w, y)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_fused_equals_reference_fp32(chunk):
    torch.manual_seed(0)
    h, w = torch.randn(50, 16), torch.randn(97, 16) * 0.3
    y = torch.randint(0, 97, (50,))
    y[::5] = -100  # ignored rows
    a = _grads(lambda h, w, y: lm_head_cross_entropy(h, w, y, chunk_size=chunk), h, w, y)
    b = _grads(lm_head_cross_entropy_reference, h, w, y)
    for got, want in zip(a, b):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_fused_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    h, w = torch.randn(64, 32), torch.randn(200, 32) * 0.2
    y = torch.randint(0, 200, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = _grads(lambda h, w, y: lm_head_cross_entropy(h, w, y, chunk_size=16), h, w, y)
    b = _grads(lm_head_cross_entropy_reference, h, w, y)
    torch.testing.assert_close(a[0], b[0], atol=2e-2, rtol=1e-2)
    for got, want in zip(a[1:], b[1:]):
        torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=5e-2)


def test_no_grad_path_gives_same_loss():
    torch.manual_seed(0)
    h, w, y = torch.randn(30, 8), torch.randn(40, 8), torch.randint(0, 40, (30,))
    with torch.no_grad():
        a = lm_head_cross_entropy(h, w, y, chunk_size=4)
    torch.testing.assert_close(a, lm_head_cross_entropy_reference(h, w, y))


def test_all_rows_ignored_is_nan_like_cross_entropy():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    y = torch.full((4,), -100)
    assert torch.isnan(lm_head_cross_entropy(h, w, y)) and torch.isnan(lm_head_cross_entropy_reference(h, w, y))


@pytest.mark.parametrize("tie", [True, False])
def test_model_loss_equals_cross_entropy_of_logits(tie):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, context_length=16, d_model=32, n_layers=2, n_heads=4, tie_embeddings=tie)
    m1 = GPT(cfg)
    m2 = GPT(cfg)
    m2.load_state_dict(m1.state_dict())
    x, y = torch.randint(0, 101, (3, 16)), torch.randint(0, 101, (3, 16))
    fused = m1(x, targets=y)
    plain = F.cross_entropy(m2(x).flatten(0, 1), y.flatten())
    fused.backward()
    plain.backward()
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    for (name, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("pad_to", [8, 64])
def test_padded_vocabulary_changes_nothing(pad_to):
    # 97 ids padded to 104 or 128 inside the loss: same loss and gradients, weight grad keeps the real shape.
    torch.manual_seed(0)
    h, w = torch.randn(40, 16), torch.randn(97, 16) * 0.3
    y = torch.randint(0, 97, (40,))
    y[::7] = -100
    a = _grads(lambda h, w, y: lm_head_cross_entropy(h, w, y, chunk_size=16, pad_vocab_to=pad_to), h, w, y)
    b = _grads(lm_head_cross_entropy_reference, h, w, y)
    assert a[2].shape == w.shape
    for got, want in zip(a, b):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("need_grad", [True, False])
def test_one_pass_spelling_equals_the_eager_one(need_grad):
    # The compiled path's elementwise softmax − one-hot (no scatter) against the eager in-place one, with
    # padding columns from id 97 on: same per-row losses and logit gradients, zero gradient on the padding.
    from llmscratch.model.loss import _losses_and_logit_grads

    torch.manual_seed(0)
    logits = torch.randn(12, 104) * 3
    y = torch.randint(0, 97, (12,))
    loss_a, g_a = _losses_and_logit_grads(logits.clone(), y, 97, need_grad, one_pass=False)
    loss_b, g_b = _losses_and_logit_grads(logits.clone(), y, 97, need_grad, one_pass=True)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-6)
    want = F.cross_entropy(logits[:, :97], y, reduction="none")
    torch.testing.assert_close(loss_b, want, atol=1e-5, rtol=1e-6)
    if need_grad:
        torch.testing.assert_close(g_b, g_a, atol=1e-6, rtol=1e-5)
        assert torch.all(g_b[:, 97:] == 0)
        torch.testing.assert_close(g_b.sum(dim=1), torch.zeros(12), atol=1e-5, rtol=0)
    else:
        assert g_a is None and g_b is None
