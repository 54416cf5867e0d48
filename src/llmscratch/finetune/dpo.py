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
from pathlib import Path

import torch
import torch.nn.functional as F

from llmscratch import runs
from llmscratch.data.instruct import IGNORE_INDEX
from llmscratch.errors import UserError
from llmscratch.fileio import atomic_write_text
from llmscratch.finetune.defaults import DPO, dpo_train_config
from llmscratch.finetune.stage import Stage, StageResult, answer_test_split, check_epochs, check_max_length
from llmscratch.train.config import TrainConfig
from llmscratch.train.metrics import read_metrics, save_figure, subplots
from llmscratch.train.trainer import unpack_loss

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
        from llmscratch.train.distributed import run_as_forward

        # (2B,): chosen rows, then rejected; through DDP's forward under torchrun, so the gradients are averaged
        logps = run_as_forward(model, sequence_logprobs, batch.x, batch.y, self.average)
        policy_c, policy_r = logps.chunk(2)
        if batch.ref_chosen is not None:
            ref_c, ref_r = batch.ref_chosen, batch.ref_rejected
        elif self.reference is not None:
            with torch.no_grad(), self.reference() as ref_model:  # (the sharded model itself under FSDP2, with LoRA)
                ref_c, ref_r = run_as_forward(ref_model, sequence_logprobs, batch.x, batch.y, self.average).chunk(2)
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
    from tqdm import tqdm

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
    rows = read_metrics(metrics_csv)
    train_rows = [r for r in rows if r["kind"] == "train" and r.get("train_reward_margin")]
    eval_rows = [r for r in rows if r["kind"] == "eval" and r.get("val_reward_margin")]
    if not train_rows and not eval_rows:
        return None
    fig, axes = subplots(1, 3, figsize=(13, 3.8))
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
    return save_figure(fig, out_png)


# ---------------------------------------------------------------------------------------------------------
# the stage


def run_dpo(checkpoint: str | Path, data: str | Path, out: str | Path, *, prompt_style: str | None = None,
            beta: float = DPO.beta, label_smoothing: float = DPO.label_smoothing, precompute: bool = False,
            average_logprobs: bool = False, train_cfg: TrainConfig | None = None, epochs: float | None = DPO.epochs,
            max_length: int | None = None, val_fraction: float = DPO.val_fraction,
            test_fraction: float = DPO.test_fraction, split_seed: int = DPO.split_seed,
            max_new_tokens: int = DPO.max_new_tokens, n_samples: int = DPO.samples, lora=None, resume: bool = False,
            overwrite: bool = False, progress: bool = True, log=print) -> StageResult:
    """Preference-tune `checkpoint` on `data` into `out`; see `llmscratch finetune dpo -h`.

    Writes the tuned model (or with `lora` its adapter), prompt_style.json, metrics.csv, loss.png, dpo.png,
    dpo_metrics.json (validation metrics and sample answers before and after) and test_responses.json. The
    result's `metrics` holds `before` and `after` (validation metrics), `samples` and `responses`."""
    from llmscratch.prompts import get_style, load_style, save_style

    stage = Stage("dpo", checkpoint, out, train_cfg or dpo_train_config(), resume=resume, overwrite=overwrite,
                  lora=lora, log=log, data=data)
    log, progress = stage.log, progress and stage.ranks.main  # under torchrun rank 0 alone speaks
    if beta <= 0:
        raise UserError(f"--beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"--label-smoothing must be in [0, 0.5), got {label_smoothing}")
    check_epochs(epochs)
    saved_style = load_style(stage.base_folder)
    style = get_style(prompt_style) if prompt_style else saved_style or get_style("alpaca")
    records = stage.main_first(lambda: _load_preferences(data))
    model, tok = stage.load_base()
    max_length = check_max_length(max_length, model.config.context_length)
    recs = _split(records, split_seed, val_fraction, test_fraction)
    train_pairs, val_pairs = _encode(recs, tok, style, max_length, stage.cfg.batch_size, log)
    style_note = ("" if prompt_style or saved_style else
                  f" (none saved with {stage.base_folder}: using alpaca; pass --prompt-style to choose)")
    log(f"{len(records)} preference records from {data} → train {len(recs[0])} / val {len(recs[1])} / test "
        f"{len(recs[2])} (seed {split_seed}); prompt style {style.name}{style_note}")

    run = _DPORun(stage, model, tok, style, beta, label_smoothing, average_logprobs, progress)
    loss_fn = run.loss_fn(precompute, train_pairs + val_pairs)
    batches = stage.batches(train_pairs, val_pairs, run.collate, own_rows=True)  # (a rank's pairs: both rows)
    cfg = stage.steps_for_epochs(epochs, batches.batches_per_epoch)
    log(f"{cfg.max_steps} steps of {cfg.batch_size * cfg.grad_accum} pairs "
        f"({cfg.max_steps * cfg.batch_size * cfg.grad_accum / len(train_pairs):.2f} epochs)")
    eval_pairs = val_pairs or train_pairs
    sample_recs = (recs[2] or recs[1] or recs[0])[:max(0, n_samples)]
    before, before_answers = run.before_training(eval_pairs, loss_fn, sample_recs, max_new_tokens, resume)

    reference = "precomputed" if precompute else ("adapters-off" if lora is not None else "frozen-copy")
    dpo_hp = {"beta": beta, "label_smoothing": label_smoothing, "reference": reference,
              "average_logprobs": average_logprobs}
    hparams = {"data": str(data), "prompt_style": style.name, "dpo": dpo_hp, "epochs": epochs,
               "max_length": max_length,
               "split": {"seed": split_seed, "val_fraction": val_fraction, "test_fraction": test_fraction}}
    result = stage.train(model, batches, cfg, tok, hparams, before=lambda o: save_style(o, style.name),
                         loss_fn=loss_fn, perplexity=False, loss_label="DPO loss")
    if not stage.end_training():  # rank 0 alone evaluates, answers and writes
        return stage.result(result, *map(len, recs))
    model = run.use(stage.trained(model), loss_fn)
    after = run.evaluate(eval_pairs, loss_fn)
    log("after:  " + _describe(after))
    samples = [{"instruction": r["instruction"], "input": r.get("input", ""), "chosen": r["chosen"],
                "rejected": r["rejected"], "before": b, "after": a}
               for r, b, a in zip(sample_recs, before_answers or [None] * len(sample_recs),
                                  run.answers(sample_recs, max_new_tokens))]
    responses = answer_test_split(result, model, tok, style, recs[2], stage.out, max_new_tokens, progress, log)
    stage.finish(model, tok, result)
    summary = {"split": "val" if val_pairs else "train", "n_pairs": len(eval_pairs), "before": before,
               "after": after, "steps": result.step, "stopped_early": result.stopped_early,
               "samples": samples, **dpo_hp}
    atomic_write_text(stage.out / runs.DPO_METRICS, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    plot_dpo(stage.out / runs.METRICS_CSV, stage.out / runs.DPO_PLOT)
    return stage.result(result, *map(len, recs),
                        metrics={"before": before, "after": after, "samples": samples, "responses": responses})


def _load_preferences(data):
    from llmscratch.data.preference import load_preferences

    return load_preferences(data)


def _split(records, seed: int, val_fraction: float, test_fraction: float):
    from llmscratch.data.instruct import split_records

    return split_records(records, seed, val_fraction, test_fraction)


def _encode(recs, tok, style, max_length: int, batch_size: int, log):
    """Token pairs of the train and validation records; UserError when fewer than one batch."""
    from llmscratch.data.preference import encode_preferences

    train_pairs, train_stats = encode_preferences(recs[0], tok, style, max_length)
    val_pairs, val_stats = encode_preferences(recs[1], tok, style, max_length)
    if len(train_pairs) < batch_size:
        raise UserError(f"{len(train_pairs)} training pairs are fewer than one batch of {batch_size}; lower "
                        "--train.batch_size or add data")
    log(f"train: {train_stats.describe(max_length)}; val: {val_stats.describe(max_length)}")
    return train_pairs, val_pairs


class _DPORun:
    """What a DPO run needs around the trainer: the reference, evaluation before and after, sample answers."""

    def __init__(self, stage: Stage, model, tok, style, beta: float, label_smoothing: float, average: bool,
                 progress: bool):
        from llmscratch.data.preference import PreferenceCollate
        from llmscratch.runtime import autocast_dtype

        self.stage, self.model, self.tok, self.style = stage, model, tok, style
        self.beta, self.label_smoothing, self.average, self.progress = beta, label_smoothing, average, progress
        self.device = stage.device
        self.amp = autocast_dtype(stage.cfg.precision, self.device)
        self.eval_batch = 2 * stage.cfg.batch_size
        model.to(self.device)
        self.collate = PreferenceCollate(pad_id=tok.eos_id, device=self.device)

    def loss_fn(self, precompute: bool, pairs: list) -> DPOLoss:
        """The DPO loss with its reference: log-probs scored once before training (`precompute`), the same
        model with its adapters off (LoRA), or a frozen copy of the starting model. Applies LoRA when asked."""
        if precompute:
            precompute_reference(self.model, pairs, self.collate, self.eval_batch, self.amp, self.device,
                                 self.average, self.progress)
            reference, how = None, "precomputed once (no reference model in memory)"
        self.stage.apply_lora(self.model)
        if not precompute and self.stage.lora is not None:
            reference, how = adapters_off_reference(self.model), "the same model with its adapters off"
        elif not precompute:
            reference, how = frozen_reference(self.model), "a frozen copy of the starting model"
        self.stage.log(f"reference log-probs: {how}; beta {self.beta}, label smoothing {self.label_smoothing}")
        return DPOLoss(self.beta, self.label_smoothing, reference, self.average)

    def use(self, model, loss_fn: DPOLoss):
        """Go on with `model` (after FSDP2: the trained model gathered whole), also as the adapters-off reference;
        returns it."""
        if self.model is not model:
            self.model = model
            if self.stage.lora is not None and loss_fn.reference is not None:
                loss_fn.reference = adapters_off_reference(model)
        return model

    def evaluate(self, pairs: list, loss_fn: DPOLoss) -> dict[str, float]:
        return evaluate_pairs(self.model, pairs, loss_fn, self.collate, self.eval_batch, self.amp, self.device)

    def before_training(self, pairs: list, loss_fn: DPOLoss, records: list[dict], max_new_tokens: int,
                        resume: bool) -> tuple[dict[str, float], list[str]]:
        """(validation metrics, answers to `records`) of the model before training (no answers when resumed: it
        is no longer the starting model), logged. Under torchrun only rank 0 reports them: ({}, []) elsewhere."""
        if not self.stage.ranks.main:
            return {}, []
        before = self.evaluate(pairs, loss_fn)
        answers = self.answers(records, max_new_tokens) if not resume else []
        self.stage.log("before: " + _describe(before))
        return before, answers

    def answers(self, records: list[dict], max_new_tokens: int) -> list[str]:
        if not records:
            return []
        from llmscratch.generate import generate_batch

        texts = generate_batch(self.model, self.tok, [self.style.prompt(r) for r in records],
                               max_new_tokens=max_new_tokens, stop=self.style.stop)
        return [self.style.clean(t) for t in texts]


def _describe(m: dict[str, float]) -> str:
    return (f"loss {m['loss']:.4f}, reward margin {m['reward_margin']:.4f} (chosen {m['reward_chosen']:.4f}, "
            f"rejected {m['reward_rejected']:.4f}), reward accuracy {m['reward_accuracy']:.1%}, "
            f"log-prob chosen {m['logp_chosen']:.2f} / rejected {m['logp_rejected']:.2f} (chosen likelier in "
            f"{m['logp_accuracy']:.1%})"
            + ("" if math.isfinite(m["loss"]) else " (non-finite)"))
