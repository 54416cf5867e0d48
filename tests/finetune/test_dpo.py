"""DPO: the loss against a hand computation, answer log-probs against log_softmax, the three references agreeing
(precomputed, frozen copy, adapters off), a few steps raising the reward margin, and `finetune dpo` end to end."""

import csv
import json
import math

import pytest
import torch
from clitools import assert_user_error, run

from llmscratch.config import ModelConfig
from llmscratch.data.instruct import IGNORE_INDEX
from llmscratch.data.preference import PreferenceCollate, encode_preferences
from llmscratch.finetune.dpo import (
    DPOLoss,
    adapters_off_reference,
    dpo_loss,
    evaluate_pairs,
    frozen_reference,
    precompute_reference,
    reward_stats,
    sequence_logprobs,
)
from llmscratch.model import GPT
from llmscratch.prompts import get_style

RECORDS = [
    {"instruction": f"Answer question {i}.", "input": "", "chosen": f"Sure, the answer is {i}.",
     "rejected": f"Figure out {i} yourself!"} for i in range(12)
]


@pytest.fixture(scope="module")
def tok():
    from llmscratch.tokenizer import BPETokenizer

    return BPETokenizer.train(["bytes"], 257, progress=False)


def micro(tok, seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size, context_length=256))


@pytest.fixture()
def pairs(tok):
    return encode_preferences(RECORDS, tok, get_style("alpaca"), max_length=256)[0]


def perturb(model, seed=3, std=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


# --- the math ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_loss_equals_a_hand_computation(smoothing):
    pc, pr = torch.tensor([-10.0, -5.0, -3.0]), torch.tensor([-12.0, -4.0, -3.0])
    rc, rr = torch.tensor([-11.0, -5.5, -2.0]), torch.tensor([-11.5, -4.5, -4.0])
    beta = 0.1
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, smoothing)
    # rewards: chosen 0.1·(1, 0.5, -1) = (0.1, 0.05, -0.1); rejected 0.1·(-0.5, 0.5, 1) = (-0.05, 0.05, 0.1)
    margins = [0.15, 0.0, -0.2]
    softplus = lambda z: math.log1p(math.exp(z))  # -log σ(m) = softplus(-m)
    expected = sum((1 - smoothing) * softplus(-m) + smoothing * softplus(m) for m in margins) / 3
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(chosen, torch.tensor([0.1, 0.05, -0.1]))
    torch.testing.assert_close(rejected, torch.tensor([-0.05, 0.05, 0.1]))
    stats = reward_stats(chosen, rejected)
    assert float(stats["reward_margin"]) == pytest.approx(sum(margins) / 3, abs=1e-7)
    assert float(stats["reward_accuracy"]) == pytest.approx(1 / 3)  # a tie is not a win
    assert float(stats["reward_chosen"]) == pytest.approx(0.05 / 3, abs=1e-7)


def test_dpo_loss_at_the_reference_is_log_2_and_its_gradient_favours_chosen():
    pc = torch.tensor([-4.0], requires_grad=True)
    pr = torch.tensor([-4.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, pc.detach(), pr.detach(), beta=0.5)
    assert float(loss.detach()) == pytest.approx(math.log(2))
    loss.backward()
    assert float(pc.grad) == pytest.approx(-0.25) and float(pr.grad) == pytest.approx(0.25)  # -β·σ(0), +β·σ(0)


def test_sequence_logprobs_sum_answer_tokens_only(tok, pairs):
    model = micro(tok).eval()
    batch = PreferenceCollate(tok.eos_id)(pairs[:3])
    logp = torch.log_softmax(model(batch.x).float(), dim=-1)  # (N, T, V)
    keep = batch.y != IGNORE_INDEX
    picked = logp.gather(-1, batch.y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(model, batch.x, batch.y), picked.sum(-1))
        torch.testing.assert_close(sequence_logprobs(model, batch.x, batch.y, average=True),
                                   picked.sum(-1) / keep.sum(-1))


# --- references ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_precomputed_and_live_reference_give_the_same_loss(tok, pairs, smoothing):
    model = micro(tok)
    collate = PreferenceCollate(tok.eos_id)
    live = DPOLoss(0.1, smoothing, frozen_reference(model))  # a frozen copy of the starting model
    precompute_reference(model, pairs, collate, batch_size=5, progress=False)  # other batches, other padding
    perturb(model)  # the policy moves away from the reference
    batch = collate(pairs[:6])
    assert batch.ref_chosen is not None
    pre_loss, n, pre_stats = DPOLoss(0.1, smoothing)(model, batch)
    live_loss, _, live_stats = live(model, batch._replace(ref_chosen=None, ref_rejected=None))
    assert float(pre_loss) != pytest.approx(math.log(2), abs=1e-3)  # not trivially at the reference
    torch.testing.assert_close(pre_loss, live_loss, rtol=1e-5, atol=1e-5)
    for k in pre_stats:
        torch.testing.assert_close(pre_stats[k], live_stats[k], rtol=1e-5, atol=1e-5)
    assert n == batch.n_targets


def test_adapters_off_reference_equals_a_frozen_copy_of_the_base(tok, pairs):
    from llmscratch.lora import apply_lora, lora_layers

    model = micro(tok)
    frozen = DPOLoss(0.1, 0.0, frozen_reference(model))
    apply_lora(model, "all", rank=4, alpha=8)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0, 0.05)
    batch = PreferenceCollate(tok.eos_id)(pairs[:4])
    a, _, sa = DPOLoss(0.1, 0.0, adapters_off_reference(model))(model, batch)
    b, _, sb = frozen(model, batch)
    torch.testing.assert_close(a, b)
    assert float(sa["reward_margin"]) != 0.0
    assert model.training  # the reference switched to eval mode only inside its scope


def test_loss_without_any_reference_is_a_bug(tok, pairs):
    with pytest.raises(RuntimeError, match="reference"):
        DPOLoss()(micro(tok), PreferenceCollate(tok.eos_id)(pairs[:2]))


# --- learning ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precompute", [True, False])
def test_a_few_dpo_steps_raise_the_train_reward_margin(tok, pairs, tmp_path, precompute):
    from llmscratch.train.batches import ExampleBatches
    from llmscratch.train.trainer import TrainConfig, train

    model = micro(tok)
    collate = PreferenceCollate(tok.eos_id)
    if precompute:
        precompute_reference(model, pairs, collate, progress=False)
        loss_fn = DPOLoss(0.5)
    else:
        loss_fn = DPOLoss(0.5, reference=frozen_reference(model))
    before = evaluate_pairs(model, pairs, loss_fn, collate)
    assert before["reward_margin"] == pytest.approx(0.0, abs=1e-6) and before["loss"] == pytest.approx(math.log(2))
    cfg = TrainConfig(max_steps=10, batch_size=4, lr=2e-3, warmup_steps=1, weight_decay=0.0, eval_every=5,
                      eval_batches=1, log_every=5, save_every=100, progress=False, device="cpu", precision="fp32")
    result = train(model, ExampleBatches(pairs, pairs[:4], collate, 4, seed=0), cfg, tmp_path, loss_fn=loss_fn)
    after = evaluate_pairs(model, pairs, loss_fn, collate)
    assert after["reward_margin"] > 0.5 and after["reward_accuracy"] >= 0.9 and after["loss"] < 0.5
    assert result.history[-1]["val_reward_margin"] > 0
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(r["train_reward_margin"] for r in rows if r["kind"] == "train")


# --- CLI ---------------------------------------------------------------------------------------------------
FAST = ["--epochs", 0, "--train.max_steps", 4, "--train.batch_size", 2, "--train.eval_every", 2,
        "--train.eval_batches", 1, "--train.warmup_steps", 1, "--train.lr", 1e-3, "--train.save_every", 2,
        "--max-new-tokens", 4, "--samples", 1, "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    from llmscratch.checkpoint import save_model
    from llmscratch.prompts import save_style

    folder = save_model(tmp_path_factory.mktemp("dpo-base") / "micro", micro(tok), tok)
    save_style(folder, "phi3")  # as an instruction-tuned checkpoint carries its style
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dpo-data") / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["instruction"], "chosen": r["chosen"],
                                        "rejected": r["rejected"]}) + "\n" for r in RECORDS))
    return path


@pytest.mark.parametrize("extra", [[], ["--precompute-reference", "--label-smoothing", 0.1]])
def test_finetune_dpo_end_to_end(base, data, tmp_path, capsys, extra):
    out = tmp_path / "dpo"
    code, stdout, err = run(["finetune", "dpo", base, "--data", data, "--out", out, *FAST, *extra], capsys)
    assert code == 0, err
    assert "prompt style phi3" in stdout and "stopped at step 4" in stdout and "reward margin" in stdout
    assert ("precomputed once" in stdout) == bool(extra) and ("frozen copy" in stdout) != bool(extra)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "prompt_style.json", "metrics.csv",
                 "loss.png", "dpo.png", "dpo_metrics.json", "test_responses.json", "hyperparameters.yaml"):
        assert (out / name).is_file(), name
    assert json.loads((out / "prompt_style.json").read_text()) == {"prompt_style": "phi3"}
    summary = json.loads((out / "dpo_metrics.json").read_text())
    assert summary["before"]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert set(summary["after"]) >= {"loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"}
    assert len(summary["samples"]) == 1 and set(summary["samples"][0]) >= {"before", "after", "chosen"}
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"train_reward_margin", "val_reward_margin", "val_reward_accuracy"} <= set(rows[0])
    assert [int(r["step"]) for r in rows if r["kind"] == "eval"] == [2, 4]


def test_finetune_dpo_with_lora_resumes_and_generates(base, data, tmp_path, capsys):
    out = tmp_path / "dpo-lora"
    args = ["finetune", "dpo", base, "--data", data, "--out", out, *FAST, "--lora-rank", 4, "--lora-targets", "attn"]
    code, stdout, err = run([*args, "--train.max_steps", 2], capsys)
    assert code == 0, err
    assert "adapters off" in stdout and "LoRA rank 4" in stdout
    code, stdout, err = run([*args, "--resume"], capsys)
    assert code == 0, err
    assert "stopped at step 4" in stdout
    assert (out / "adapter.safetensors").is_file() and not (out / "model.safetensors").exists()
    code, stdout, err = run(["generate", out, "--prompt", "Answer question 1.", "--max-new-tokens", 4,
                             "--temperature", 0], capsys)
    assert code == 0, err
    code, _, err = run(["finetune", "dpo", out, "--data", data, "--out", tmp_path / "again", *FAST], capsys)
    assert_user_error(code, err, "a LoRA adapter", "lora merge")  # a stage starts from a full checkpoint


@pytest.mark.parametrize("args, content, needle", [
    (["--beta", 0], None, "--beta 0: out of range; allowed: > 0"),
    (["--label-smoothing", 0.5], None, "--label-smoothing 0.5: out of range; allowed: >= 0 and < 0.5"),
    ([], '{"prompt": "x", "chosen": "a", "rejected": "b"}\n{"prompt": "y"\n', "prefs.jsonl:2"),
    ([], '{"prompt": "x", "chosen": "a"}\n', "missing key 'rejected'"),
    (["--train.batch_size", 64], None, "fewer than one batch"),
    (["--prompt-style", "nope"], None, "unknown prompt style"),
])
def test_bad_input_exits_2_with_one_line(base, data, tmp_path, capsys, args, content, needle):
    if content is not None:
        data = tmp_path / "prefs.jsonl"
        data.write_text(content)
    code, _, err = run(["finetune", "dpo", base, "--data", data, "--out", tmp_path / "o", *FAST, *args], capsys)
    assert_user_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_finetune_dpo_on_a_qwen3_shaped_model(tok, data, tmp_path, capsys):
    """The modern configurations (RMSNorm, SwiGLU, RoPE, GQA, QK-norm) go through DPO like GPT-2's."""
    from llmscratch.checkpoint import save_model
    from llmscratch.prompts import save_style

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("qwen3-micro", vocab_size=tok.vocab_size, context_length=256))
    base = save_model(tmp_path / "qwen", model, tok)
    save_style(base, "phi3")
    code, stdout, err = run(["finetune", "dpo", base, "--data", data, "--out", tmp_path / "dpo", *FAST], capsys)
    assert code == 0, err
    assert "stopped at step 4" in stdout and (tmp_path / "dpo" / "dpo_metrics.json").is_file()
