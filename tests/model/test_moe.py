"""Mixture of experts (model/moe.py): the grouped dispatch equals the dense reference and runs each expert on its
own tokens only; the load-balancing loss equals a hand computation and transformers' function; gradients reach
the router and the chosen experts only; cached decoding equals the uncached forward; the trainer adds and logs the
auxiliary loss; `info` prints total and active parameters."""

import csv
import math

import pytest
import torch
from clitools import run as cli

from llmscratch.config import ModelConfig
from llmscratch.generate import generate_ids
from llmscratch.model import GPT
from llmscratch.model.moe import MoEFeedForward, load_balancing_loss, moe_reference, route, router_statistics
from llmscratch.model.transformer import flops_per_token


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, norm="rmsnorm",
                mlp="swiglu", position="rope", bias=False, qkv_bias=False, tie_embeddings=False, d_ff=48,
                n_experts=5, n_experts_per_token=2, moe_d_ff=24)
    return ModelConfig(**{**base, **kw})


def spread_router(layer: MoEFeedForward) -> None:
    """A router with large weights, so the tokens spread over the experts instead of all picking alike."""
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shared", [0, 16])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("n_experts", [3, 5, 7])
def test_dispatch_equals_the_dense_reference(n_experts, top_k, shared, normalize):
    layer = MoEFeedForward(moe_cfg(n_experts=n_experts, n_experts_per_token=top_k, shared_expert_d_ff=shared,
                                   moe_normalize_topk=normalize))
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    spread_router(layer)
    x = torch.randn(3, 11, 32)
    seen = [0] * n_experts  # rows each expert was run on by the layer
    hooks = [expert.register_forward_hook(lambda m, args, out, e=e: seen.__setitem__(e, seen[e] + args[0].size(0)))
             for e, expert in enumerate(layer.experts)]
    with torch.no_grad():
        got = layer(x)
        for h in hooks:
            h.remove()
        want = moe_reference(x.reshape(-1, 32), layer.router.weight, layer.experts, top_k, normalize, layer.shared)
    torch.testing.assert_close(got.reshape(-1, 32), want, atol=1e-6, rtol=1e-5)
    # grouped dispatch: each expert saw exactly its assigned tokens, N·k rows in all, not N each
    chosen = (x.reshape(-1, 32) @ layer.router.weight.T).topk(top_k, dim=-1).indices
    assert seen == torch.bincount(chosen.flatten(), minlength=n_experts).tolist()
    assert sum(seen) == 33 * top_k and (n_experts == 1 or max(seen) < 33 * top_k)


def test_normalised_weights_sum_to_one_and_raw_ones_do_not():
    x = torch.randn(20, 32)
    for normalize in (True, False):
        layer = MoEFeedForward(moe_cfg(moe_normalize_topk=normalize))
        spread_router(layer)
        probs, weights, chosen = route(layer.router(x), 2, normalize)
        assert probs.dtype == torch.float32 and torch.allclose(probs.sum(-1), torch.ones(20))
        total = weights.sum(-1)
        assert torch.allclose(total, torch.ones(20)) == normalize
        assert torch.equal(chosen, probs.topk(2, dim=-1).indices)


def test_aux_loss_equals_a_hand_computation():
    # two layers, three tokens each, three experts, top-2; probabilities chosen by hand
    p1 = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    p2 = torch.tensor([[0.5, 0.4, 0.1], [0.5, 0.1, 0.4], [0.45, 0.15, 0.4]])
    c1 = torch.tensor([[0, 1], [1, 2], [0, 2]])  # each row's two largest
    c2 = torch.tensor([[0, 1], [0, 2], [0, 2]])
    # assignments per expert over both layers: e0: 2 + 3 = 5, e1: 2 + 1 = 3, e2: 2 + 2 = 4 → f = counts / 6 tokens
    f = [5 / 6, 3 / 6, 4 / 6]
    # mean probability per expert over the 6 tokens
    P = [(0.6 + 0.2 + 0.6 + 0.5 + 0.5 + 0.45) / 6, (0.3 + 0.5 + 0.1 + 0.4 + 0.1 + 0.15) / 6,
         (0.1 + 0.3 + 0.3 + 0.1 + 0.4 + 0.4) / 6]
    want = 3 * sum(fe * pe for fe, pe in zip(f, P))
    got = load_balancing_loss([router_statistics(p1, c1), router_statistics(p2, c2)], n_experts=3)
    assert math.isclose(float(got), want, rel_tol=1e-6)
    # the bounds: perfectly even routing gives k, everything on the same k experts gives n_experts
    even = torch.full((4, 4), 0.25)
    assert math.isclose(float(load_balancing_loss([router_statistics(even, torch.tensor([[0, 1], [2, 3]] * 2))],
                                                  4)), 2.0, rel_tol=1e-6)
    peaked = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 4)
    assert math.isclose(float(load_balancing_loss([router_statistics(peaked, torch.tensor([[0, 1]] * 4))], 4)),
                        4.0, rel_tol=1e-6)


def test_model_aux_loss_equals_transformers_load_balancing_loss():
    qwen3_moe = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    model = GPT(moe_cfg(n_experts=7, n_experts_per_token=2, n_layers=3)).train()
    logits = []
    for block in model.blocks:
        spread_router(block.mlp)
        block.mlp.router.register_forward_hook(lambda m, args, out: logits.append(out))
    model(torch.randint(0, 97, (2, 13)))
    want = qwen3_moe.load_balancing_loss_func(tuple(logits), 7, 2)
    got = model.aux_loss()
    assert got is not None and math.isclose(float(got.detach()), float(want.detach()), rel_tol=1e-5)
    model.eval()
    model(torch.randint(0, 97, (2, 13)))
    assert model.aux_loss() is None  # no statistics kept outside training
    assert GPT(ModelConfig(vocab_size=97, context_length=32, d_model=32, n_layers=1, n_heads=4)).aux_loss() is None


def test_gradients_reach_the_router_and_the_chosen_experts_only():
    layer = MoEFeedForward(moe_cfg(n_experts=7, n_experts_per_token=2))
    spread_router(layer)
    x = torch.randn(1, 2, 32)  # two tokens: at most four of the seven experts are chosen
    layer(x).square().sum().backward()
    with torch.no_grad():
        chosen = set((x.reshape(-1, 32) @ layer.router.weight.T).topk(2, dim=-1).indices.flatten().tolist())
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    for e, expert in enumerate(layer.experts):
        grads = [p.grad for p in expert.parameters()]
        if e in chosen:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), e
        else:
            assert all(g is None for g in grads), e


def test_cached_decoding_equals_the_uncached_forward():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("qwen3-moe-micro")).eval()
    for block in model.blocks:
        spread_router(block.mlp)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(ids)
        model.setup_kv_cache(2, 32)
        steps = [model(ids[:, :10], input_pos=0)] + [model(ids[:, t:t + 1], input_pos=t) for t in range(10, 24)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    cached = torch.stack(list(generate_ids(model, ids[:, :5], 12)), 1)
    uncached = torch.stack(list(generate_ids(model, ids[:, :5], 12, use_cache=False)), 1)
    assert torch.equal(cached, uncached)


def test_active_parameters_flops_and_init():
    cfg = ModelConfig.from_preset("qwen3-moe-micro")
    model = GPT(cfg)
    expert = 3 * 64 * 32  # gate, up, proj of one expert
    assert model.num_active_params() == model.num_params() - 2 * (8 - 2) * expert
    dense_like = cfg.replace(n_experts=0, d_ff=2 * 32)  # the two active experts' width as one dense MLP
    router = 2 * 2 * 64 * 8  # 2 FLOPs · layers · d_model · experts
    assert flops_per_token(cfg, 16, False) == flops_per_token(dense_like, 16, False) + router
    # the expert projections into the residual stream get GPT-2's scaled init, the rest the plain std
    with torch.no_grad():
        proj = torch.cat([b.mlp.experts[e].proj.weight.flatten() for b in model.blocks for e in range(8)])
        gate = torch.cat([b.mlp.experts[e].gate.weight.flatten() for b in model.blocks for e in range(8)])
    assert abs(float(proj.std()) - 0.02 / math.sqrt(4)) < 0.001 and abs(float(gate.std()) - 0.02) < 0.001


def test_training_adds_and_logs_the_aux_loss(prepared, tmp_path):
    from llmscratch.train.pretrain import LMBatches
    from llmscratch.train.trainer import TrainConfig, lm_loss, train

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("qwen3-moe-micro", vocab_size=300, context_length=32))
    batch = (torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16)))
    loss, n, extras = lm_loss(model.train(), batch)
    plain = model.eval()(batch[0], targets=batch[1])
    coef = model.config.router_aux_loss_coef
    assert n == 32 and set(extras) == {"aux_loss"} and coef == 0.001
    torch.testing.assert_close(loss, plain + coef * extras["aux_loss"])
    assert len(lm_loss(model.eval(), batch)) == 2  # evaluation: the plain loss

    cfg = TrainConfig(max_steps=30, batch_size=4, lr=1e-2, warmup_steps=3, eval_every=15, eval_batches=2,
                      log_every=1, save_every=30, progress=False, device="cpu")
    train(model.train(), LMBatches(prepared, 4, 32, 0), cfg, tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "train"]
    losses = [float(r["train_loss"]) for r in rows]
    aux = [float(r["train_aux_loss"]) for r in rows]
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(2.0 - 1e-4 <= a <= 8.0 for a in aux), aux  # between k (even) and n_experts (collapsed)


def test_info_prints_total_and_active_parameters(capsys):
    code, out, err = cli(["info", "qwen3-30b-a3b"], capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("experts"))
    assert "128 per layer, 8 per token" in line and "(30.53B)" in line and "(3.35B)" in line
    code, out, _ = cli(["info", "qwen3-micro"], capsys)
    assert code == 0 and "experts" not in out


def test_batched_rows_equal_decoding_alone():
    """The CPU batched decoder (generate.DecodeBatch: padded prompt chunks, rows at their own positions) gives
    every row of a MoE model the tokens it gets alone: routing is per token, so padding and neighbours do not
    change it."""
    from llmscratch.generate import DecodeBatch, Row

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("qwen3-moe-micro")).eval()
    for block in model.blocks:
        spread_router(block.mlp)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (1, 7, 3, 12)]
    batch = DecodeBatch(model, max_rows=4)
    rows = [Row(p) for p in prompts]
    for r in rows:
        batch.add(r)
    for _ in range(12):
        batch.step()
    batch.close()
    for p, r in zip(prompts, rows):
        assert r.generated == [int(t[0]) for t in generate_ids(model, torch.tensor([p]), 12)]


def test_activation_checkpointing_gives_the_same_loss_and_router_gradients():
    """The recomputed forward in backward overwrites the layers' router statistics; the loss and gradients must
    not change."""
    from llmscratch.train.trainer import lm_loss

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("qwen3-moe-micro")).train()
    batch = (torch.randint(0, 512, (2, 16)), torch.randint(0, 512, (2, 16)))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.set_options(activation_checkpointing=recompute)
        loss, _, extras = lm_loss(model, batch)
        loss.backward()
        grads.append((loss.detach(), extras["aux_loss"], model.blocks[0].mlp.router.weight.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
