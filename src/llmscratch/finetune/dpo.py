"""Direct Preference Optimization (Rafailov et al. 2023; the book's chapter-7 bonus): tune an instruction model to
prefer the chosen answer of each pair over the rejected one, against a frozen reference (the starting model).

With π the model being tuned and π_ref the reference, for a prompt x with chosen y_c and rejected y_r:

    reward(y)  = β · (log π(y|x) − log π_ref(y|x))                    (the implicit reward, eq. 5)
    loss       = −log σ(reward(y_c) − reward(y_r))                     (eq. 7)

log π(y|x) sums the log-probabilities of the answer's tokens only (the prompt is masked). With label smoothing ε
the preference label is taken as wrong with probability ε (conservative DPO, Mitchell 2023):
loss = −(1−ε)·log σ(Δ) − ε·log σ(−Δ).

The reference costs no second model when it can be avoided: `--precompute-reference` scores every pair with the
starting model once, before training, and stores the numbers with the examples; with LoRA the reference is the
same model with its adapters switched off. Otherwise a frozen copy of the starting model scores each batch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmscratch.data.instruct import IGNORE_INDEX
from llmscratch.errors import UserError
from llmscratch.finetune.defaults import dpo_train_config
from llmscratch.train.trainer import TrainConfig, TrainResult, latest_checkpoint, train, unpack_loss

METRICS_FILE = "dpo_metrics.json"


# ---------------------------------------------------------------------------------------------------------
# the math


def sequence_logprobs(model, x: torch.Tensor, y: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log π(answer | prompt) per row (N,): the sum (or with `average` the mean) of log p(y_t) over the targets
    that are not -100. The head runs only at those positions, not at every prompt and padding position."""
    h = model.features(x)  # (N, T, d)
    keep = y != IGNORE_INDEX  # (N, T)
    logits = model.lm_head(h[keep]).float()  # (M, V) for the M answer positions of the batch
    token_logp = -F.cross_entropy(logits, y[keep], reduction="none")  # (M,)
    rows = keep.nonzero()[:, 0]
    total = torch.zeros(y.size(0), dtype=token_logp.dtype, device=y.device).index_add(0, rows, token_logp)
    if average:
        total = total / keep.sum(-1).clamp(min=1)
    return total


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, chosen rewards, rejected rewards) of a batch from the four (B,) log-probabilities (eq. 7 of
    the DPO paper; with label smoothing ε the conservative-DPO mixture of both label directions)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    margin = chosen_rewards - rejected_rewards
    losses = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


def reward_stats(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch means of the rewards, their margin, and the share of pairs whose chosen reward is higher."""
    return {"reward_chosen": chosen_rewards.mean(), "reward_rejected": rejected_rewards.mean(),
            "reward_margin": (chosen_rewards - rejected_rewards).mean(),
            "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean()}


# ---------------------------------------------------------------------------------------------------------
# the reference model and the trainer's loss


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def frozen_reference(model):
    """A reference that scores with a frozen copy of `model` as it is now (one more model in memory)."""
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    return lambda: contextlib.nullcontext(ref)


def adapters_off_reference(model):
    """A reference that scores with `model` itself, its LoRA adapters switched off (and dropout off): the base
    model, at no memory cost."""
    from llmscratch.lora import lora_disabled

    @contextlib.contextmanager
    def scope():
        with _eval_mode(model), lora_disabled(model):
            yield model
    return scope


class DPOLoss:
    """The trainer's `loss_fn` for `PreferenceBatch`es: returns (loss, answer tokens, reward statistics).

    `reference()` gives a context whose value is the model to score the reference log-probs with; batches that
    carry precomputed reference log-probs do not need it."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, reference=None, average: bool = False):
        self.beta, self.label_smoothing, self.reference, self.average = beta, label_smoothing, reference, average

    def __call__(self, model, batch):
        logps = sequence_logprobs(model, batch.x, batch.y, self.average)  # (2B,): chosen rows, then rejected
        policy_c, policy_r = logps.chunk(2)
        if batch.ref_chosen is not None:
            ref_c, ref_r = batch.ref_chosen, batch.ref_rejected
        elif self.reference is not None:
            with torch.no_grad(), self.reference() as ref_model:
                ref_c, ref_r = sequence_logprobs(ref_model, batch.x, batch.y, self.average).chunk(2)
        else:
            raise RuntimeError("DPOLoss needs a reference model or batches with precomputed reference log-probs")
        loss, chosen_r, rejected_r = dpo_loss(policy_c, policy_r, ref_c, ref_r, self.beta, self.label_smoothing)
        extras = reward_stats(chosen_r, rejected_r)
        # The model's own preference, before any reward exists: how often it finds the chosen answer likelier.
        extras.update(logp_chosen=policy_c.detach().mean(), logp_rejected=policy_r.detach().mean(),
                      logp_accuracy=(policy_c > policy_r).float().mean().detach())
        return loss, batch.n_targets, extras


@torch.no_grad()
def precompute_reference(model, pairs: list, collate, batch_size: int = 16, amp_dtype=None, device="cpu",
                         average: bool = False, progress: bool = True) -> None:
    """Score every pair with `model` (the reference, in eval mode) once and store the log-probs on the pairs."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    with _eval_mode(model):
        for start in tqdm(range(0, len(pairs), batch_size), disable=not progress, desc="reference log-probs",
                          unit="batch", dynamic_ncols=True):
            chunk = pairs[start:start + batch_size]
            for p in chunk:
                p.ref_chosen = p.ref_rejected = None
            batch = collate(chunk)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logps = sequence_logprobs(model, batch.x, batch.y, average)
            ref_c, ref_r = logps.float().cpu().chunk(2)
            for p, c, r in zip(chunk, ref_c.tolist(), ref_r.tolist()):
                p.ref_chosen, p.ref_rejected = c, r


@torch.no_grad()
def evaluate_pairs(model, pairs: list, loss_fn: DPOLoss, collate, batch_size: int = 16, amp_dtype=None,
                   device="cpu") -> dict[str, float]:
    """Loss and reward statistics over all of `pairs`, each pair counted once (weighted by batch size)."""
    device = torch.device(device)
    totals: dict[str, float] = {}
    with _eval_mode(model):
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, _, extras = unpack_loss(loss_fn(model, collate(chunk)))
            for k, v in {"loss": loss, **extras}.items():
                totals[k] = totals.get(k, 0.0) + float(v) * len(chunk)
    return {k: v / max(1, len(pairs)) for k, v in totals.items()}


# ---------------------------------------------------------------------------------------------------------
# plots


def plot_dpo(metrics_csv: str | Path, out_png: str | Path) -> Path | None:
    """DPO loss, reward margin and reward accuracy against steps (train: running means; val: evaluations)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from llmscratch.train.metrics import read_metrics

    rows = read_metrics(metrics_csv)
    train_rows = [r for r in rows if r["kind"] == "train" and r.get("train_reward_margin")]
    eval_rows = [r for r in rows if r["kind"] == "eval" and r.get("val_reward_margin")]
    if not train_rows and not eval_rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("loss", "DPO loss"), ("reward_margin", "reward margin (chosen − rejected)"),
              ("reward_accuracy", "reward accuracy"))
    for ax, (key, title) in zip(axes, panels):
        train_key = "train_loss" if key == "loss" else f"train_{key}"
        val_key = "val_loss" if key == "loss" else f"val_{key}"
        if train_rows:
            ax.plot([int(r["step"]) for r in train_rows], [float(r[train_key]) for r in train_rows],
                    alpha=0.5, label="train (running)")
        if eval_rows:
            ax.plot([int(r["step"]) for r in eval_rows], [float(r[val_key]) for r in eval_rows], "s--",
                    label="validation")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------------------------------
# the stage


@dataclass
class DPOResult:
    train: TrainResult
    n_train: int
    n_val: int
    n_test: int
    before: dict[str, float]  # validation metrics of the starting model
    after: dict[str, float]  # ... and of the tuned one
    samples: list[dict] = field(default_factory=list)  # test (or val) prompts answered before and after
    responses: Path | None = None


def run_dpo(checkpoint: str | Path, data: str | Path, out: str | Path, *, prompt_style: str | None = None,
            beta: float = 0.1, label_smoothing: float = 0.0, precompute: bool = False, average_logprobs: bool = False,
            train_cfg: TrainConfig | None = None, epochs: float | None = 1.0, max_length: int | None = None,
            val_fraction: float = 0.05, test_fraction: float = 0.10, split_seed: int = 123,
            max_new_tokens: int = 128, n_samples: int = 3, lora=None, resume: bool = False, progress: bool = True,
            log=print) -> DPOResult:
    """Preference-tune `checkpoint` on `data` into `out`; see `llmscratch finetune dpo -h`.

    Writes the tuned model (or with `lora` its adapter), prompt_style.json, metrics.csv, loss.png, dpo.png,
    dpo_metrics.json (validation metrics and sample answers before and after) and test_responses.json."""
    from llmscratch.checkpoint import find_model_folder, load
    from llmscratch.data.instruct import split_records
    from llmscratch.data.preference import PreferenceCollate, encode_preferences, load_preferences
    from llmscratch.fileio import atomic_write_text
    from llmscratch.finetune.instruct import finish_tuning_run, steps_for_epochs
    from llmscratch.generate import generate_batch
    from llmscratch.prompts import get_style, load_style, save_style
    from llmscratch.runtime import autocast_dtype, resolve_device
    from llmscratch.train.batches import ExampleBatches
    from llmscratch.train.pretrain import check_out_dir, removed_on_failure

    out = Path(out)
    cfg = train_cfg or dpo_train_config()
    if beta <= 0:
        raise UserError(f"--beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"--label-smoothing must be in [0, 0.5), got {label_smoothing}")
    if epochs is not None and epochs <= 0:
        raise UserError(f"--epochs must be positive, got {epochs}")
    if lora is not None:
        lora.check()
    if resume and latest_checkpoint(out) is None:
        raise UserError(f"--resume: no checkpoint under {out / 'checkpoints'}; start without --resume")
    if not resume and latest_checkpoint(out) is not None:
        raise UserError(f"--out {out}: already holds a training run; pass --resume to continue it or choose "
                        "another folder")
    folder = find_model_folder(checkpoint)
    saved_style = load_style(folder)
    style = get_style(prompt_style) if prompt_style else saved_style or get_style("alpaca")
    records = load_preferences(data)
    model, tok = load(folder)
    if model.config.n_classes is not None:
        raise UserError(f"{checkpoint}: a classifier checkpoint; DPO needs a language model")
    context = model.config.context_length
    max_length = max_length or context
    if max_length > context:
        raise UserError(f"--max-length {max_length} exceeds the model's context length {context}")
    train_recs, val_recs, test_recs = split_records(records, split_seed, val_fraction, test_fraction)
    train_pairs, train_stats = encode_preferences(train_recs, tok, style, max_length)
    val_pairs, val_stats = encode_preferences(val_recs, tok, style, max_length)
    if len(train_pairs) < cfg.batch_size:
        raise UserError(f"{len(train_pairs)} training pairs are fewer than one batch of {cfg.batch_size}; lower "
                        "--train.batch_size or add data")
    style_note = ("" if prompt_style or saved_style else
                  f" (none saved with {folder}: using alpaca; pass --prompt-style to choose)")
    log(f"{len(records)} preference records from {data} → train {len(train_recs)} / val {len(val_recs)} / test "
        f"{len(test_recs)} (seed {split_seed}); prompt style {style.name}{style_note}")
    log(f"train: {train_stats.describe(max_length)}; val: {val_stats.describe(max_length)}")

    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    model.to(device)
    collate = PreferenceCollate(pad_id=tok.eos_id, device=device)
    if precompute:
        precompute_reference(model, train_pairs + val_pairs, collate, 2 * cfg.batch_size, amp, device,
                             average_logprobs, progress)
        reference, how = None, "precomputed once (no reference model in memory)"
    if lora is not None:
        from llmscratch.lora import apply_lora, lora_report

        apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout, seed=cfg.seed)
        log(str(lora_report(model)))
        if not precompute:
            reference, how = adapters_off_reference(model), "the same model with its adapters off"
    elif not precompute:
        reference, how = frozen_reference(model), "a frozen copy of the starting model"
    log(f"reference log-probs: {how}; beta {beta}, label smoothing {label_smoothing}")
    loss_fn = DPOLoss(beta, label_smoothing, reference, average_logprobs)

    batches = ExampleBatches(train_pairs, val_pairs, collate, cfg.batch_size, seed=cfg.seed)
    if epochs is not None:
        cfg.max_steps = steps_for_epochs(epochs, batches.batches_per_epoch, cfg.grad_accum)
    log(f"{cfg.max_steps} steps of {cfg.batch_size * cfg.grad_accum} pairs "
        f"({cfg.max_steps * cfg.batch_size * cfg.grad_accum / len(train_pairs):.2f} epochs)")

    eval_pairs = val_pairs or train_pairs
    sample_recs = (test_recs or val_recs or train_recs)[:max(0, n_samples)]

    def answers(m) -> list[str]:
        if not sample_recs:
            return []
        texts = generate_batch(m, tok, [style.prompt(r) for r in sample_recs], max_new_tokens=max_new_tokens,
                               stop=style.stop)
        return [style.clean(t) for t in texts]

    before = evaluate_pairs(model, eval_pairs, loss_fn, collate, 2 * cfg.batch_size, amp, device)
    before_answers = answers(model) if not resume else []
    log("before: " + _describe(before))

    created = check_out_dir(out)
    save_style(out, style.name)
    hparams = {"stage": "dpo", "base": str(checkpoint), "data": str(data), "prompt_style": style.name,
               "dpo": {"beta": beta, "label_smoothing": label_smoothing, "reference": "precomputed" if precompute
                       else ("adapters-off" if lora is not None else "frozen-copy"),
                       "average_logprobs": average_logprobs},
               "epochs": epochs, "max_length": max_length,
               "split": {"seed": split_seed, "val_fraction": val_fraction, "test_fraction": test_fraction}}
    if lora is not None:
        hparams["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "targets": lora.targets, "dropout": lora.dropout}
    with removed_on_failure(out, created):
        result = train(model, batches, cfg, out, loss_fn=loss_fn, tokenizer=tok, resume=resume, hparams=hparams,
                       perplexity=False, loss_label="DPO loss")
    after = evaluate_pairs(model, eval_pairs, loss_fn, collate, 2 * cfg.batch_size, amp, device)
    log("after:  " + _describe(after))
    after_answers = answers(model)
    samples = [{"instruction": r["instruction"], "input": r.get("input", ""), "chosen": r["chosen"],
                "rejected": r["rejected"], "before": b, "after": a}
               for r, b, a in zip(sample_recs, before_answers or [None] * len(sample_recs), after_answers)]
    responses = finish_tuning_run(result, model, tok, style, test_recs, out, max_new_tokens, folder, lora, progress,
                                  log)
    summary = {"split": "val" if val_pairs else "train", "n_pairs": len(eval_pairs), "before": before,
               "after": after, "steps": result.step, "stopped_early": result.stopped_early,
               "samples": samples, **hparams["dpo"]}
    atomic_write_text(out / METRICS_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    plot_dpo(out / "metrics.csv", out / "dpo.png")
    return DPOResult(result, len(train_recs), len(val_recs), len(test_recs), before, after, samples, responses)


def _describe(m: dict[str, float]) -> str:
    return (f"loss {m['loss']:.4f}, reward margin {m['reward_margin']:.4f} (chosen {m['reward_chosen']:.4f}, "
            f"rejected {m['reward_rejected']:.4f}), reward accuracy {m['reward_accuracy']:.1%}, "
            f"log-prob chosen {m['logp_chosen']:.2f} / rejected {m['logp_rejected']:.2f} (chosen likelier in "
            f"{m['logp_accuracy']:.1%})"
            + ("" if math.isfinite(m["loss"]) else " (non-finite)"))
