"""The one training loop. Pretraining and every fine-tuning stage call `train` with their own loss and data.

A stage supplies:
  * `batches`: a `BatchSource` — `next("train")` gives the next training batch; `next("eval_train")` and
    `next("eval_val")` give evaluation batches, which must repeat after `reset_eval()` so evaluations are
    comparable; `state_dict()` captures the data position so `--resume` continues with the very next batch;
  * `loss_fn(model, batch) -> (loss, n_tokens)`: the mean loss and how many tokens it covered. It may also
    return a third item, a dict of extra scalars (e.g. DPO's rewards): the trainer averages each over the
    batches of a logging window and of an evaluation, like the loss, and logs them as `train_<name>` and
    `val_<name>` columns of metrics.csv.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from llmscratch.checkpoint import save_model
from llmscratch.errors import UserError
from llmscratch.model.transformer import flops_per_token
from llmscratch.runtime import autocast_dtype, cpu_memory_kept_for_reuse, peak_flops, resolve_device
from llmscratch.train.config import TrainConfig
from llmscratch.train.metrics import MetricsLog, plot_losses
from llmscratch.train.schedule import lr_at

TRAIN_STATE = "train_state.pt"


class BatchSource(Protocol):
    def next(self, split: str) -> Any: ...
    def reset_eval(self) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    step: int
    tokens: int
    train_loss: float | None = None
    val_loss: float | None = None
    stopped_early: str | None = None  # "time", "interrupt" or None
    history: list[dict] = field(default_factory=list)


def lm_loss(model, batch) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy over every position of (x, y) batches (the book's calc_loss_batch).

    The model computes it with its fused LM-head loss; `F.cross_entropy(model(x).flatten(0, 1), y.flatten())`
    is the same number (tests/model/test_loss.py)."""
    x, y = batch
    return model(x, targets=y), y.numel()


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only: norms, biases and embeddings are not decayed, since
    shrinking them toward zero does not regularise anything useful (as in nanoGPT and the GPT-3 setup)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "emb" in name.split(".")[0]
        (decay if p.dim() >= 2 and not is_embedding else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused kernels missing for this device/dtype
        return torch.optim.AdamW(groups, **kwargs)


def largest_fitting_batch(try_batch: Callable[[int], None], limit: int = 256) -> int:
    """The largest power of two b ≤ `limit` for which `try_batch(b)` runs without running out of GPU memory
    (it doubles from 1 until `torch.cuda.OutOfMemoryError`). Raises UserError when not even 1 fits."""
    best, b = 0, 1
    while b <= limit:
        try:
            try_batch(b)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        best, b = b, b * 2
    if best == 0:
        raise UserError("not even one sequence per micro-batch fits in GPU memory; use a smaller model, a shorter "
                        "--context-length, or --train.activation_checkpointing true")
    return best


def set_model_options(model, cfg: TrainConfig, device: torch.device) -> None:
    """The model-side training options of `cfg` (for models that have them: GPT and its classifier)."""
    if hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = cfg.activation_checkpointing
    if hasattr(model, "low_precision_residual"):
        on = cfg.bf16_residual if cfg.bf16_residual is not None else device.type == "cuda"
        model.low_precision_residual = on


def find_micro_batch(model, context_length: int, cfg: TrainConfig, device: torch.device, limit: int = 256) -> int:
    """The micro-batch size for `cfg.batch_size == 0`: on CUDA the largest power of two whose forward and
    backward fit beside the weights, gradients and AdamW's two fp32 moments (allocated as stand-ins while
    trying); the size found is halved once as headroom for compilation and fragmentation. 8 on a CPU."""
    if device.type != "cuda":
        return 8
    amp = autocast_dtype(cfg.precision, device)
    model.to(device).train()
    set_model_options(model, cfg, device)
    vocab = model.config.vocab_size
    moments = [torch.empty(2 * p.numel(), dtype=torch.float32, device=device) for p in model.parameters()]

    def try_batch(b: int) -> None:
        x = torch.randint(0, vocab, (b, context_length), device=device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = model(x, targets=x)
        loss.backward()
        model.zero_grad(set_to_none=False)  # keep the gradient buffers: they exist during training too
        torch.cuda.synchronize(device)

    try:
        found = largest_fitting_batch(try_batch, limit)
    finally:
        del moments
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return max(1, found // 2)


def unpack_loss(out) -> tuple[torch.Tensor, int, dict]:
    """`loss_fn`'s result as (loss, n, extras): it returns (loss, n) or (loss, n, {name: scalar})."""
    if len(out) == 3:
        return out[0], out[1], out[2] or {}
    loss, n = out
    return loss, n, {}


def _rng_state() -> dict:
    _, keys, pos, _, _ = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    folder = out_dir / "checkpoints"
    steps = sorted(p for p in folder.glob("step-*") if (p / TRAIN_STATE).exists()) if folder.is_dir() else []
    return steps[-1] if steps else None


def save_checkpoint(out_dir: Path, model, tokenizer, optimizer, step: int, tokens: int, batches: BatchSource,
                    hparams: dict, keep_last: int) -> Path:
    """Write checkpoints/step-NNNNNNN atomically (a temp folder renamed into place) and prune old ones."""
    ckpt_root = out_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step:07d}.", dir=ckpt_root))
    try:
        save_model(tmp, model, tokenizer, hparams)
        torch.save({"step": step, "tokens": tokens, "optimizer": optimizer.state_dict(), "rng": _rng_state(),
                    "data": batches.state_dict()}, tmp / TRAIN_STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kept = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in kept[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise UserError(f"{ckpt / TRAIN_STATE}: cannot read training state ({exc}); "
                        "delete this checkpoint folder to resume from an earlier one") from None


class _StopFlag:
    """Turns the first Ctrl-C into a request to save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave the default behaviour
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@torch.no_grad()
def evaluate(model, batches: BatchSource, loss_fn, n_batches: int, amp_dtype, device) -> dict[str, float]:
    """Mean loss over the same `n_batches` of each split every time (the source resets its eval stream):
    {"train": loss, "val": loss}, plus "train_<name>" and "val_<name>" for each extra scalar of `loss_fn`."""
    was_training = model.training
    model.eval()
    batches.reset_eval()
    out = {}
    for split in ("train", "val"):
        total, extra_totals = 0.0, {}
        for _ in range(n_batches):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, _, extras = unpack_loss(loss_fn(model, batches.next(f"eval_{split}")))
            total += float(loss)
            for k, v in extras.items():
                extra_totals[k] = extra_totals.get(k, 0.0) + float(v)
        out[split] = total / max(1, n_batches)
        out.update({f"{split}_{k}": v / max(1, n_batches) for k, v in extra_totals.items()})
    model.train(was_training)
    return out


def train(model, batches: BatchSource, cfg: TrainConfig, out_dir: str | Path, loss_fn=lm_loss, tokenizer=None,
          resume: bool = False, hparams: dict | None = None,
          sample_fn: Callable[[torch.nn.Module], str] | None = None,
          on_step: Callable[[int, float | None], None] | None = None, perplexity: bool = True,
          loss_label: str = "cross-entropy loss (nats)") -> TrainResult:
    """Train `model` on `batches` and write checkpoints, metrics and plots under `out_dir`.

    `perplexity`: report exp(val loss) — meaningful for next-token losses only (classification and DPO turn it
    off); `loss_label` names the loss on loss.png's y-axis."""
    device = resolve_device(cfg.device)
    if cfg.max_steps <= 0:
        raise UserError(f"max_steps must be positive, got {cfg.max_steps}")
    # On a CPU the run keeps freed memory for its next steps (runtime.cpu_memory_kept_for_reuse); the training
    # loop's own tensors — optimizer state, gradients — are freed inside, so the trim on leaving returns them.
    heap = cpu_memory_kept_for_reuse() if device.type == "cpu" and cfg.cpu_heap_reuse else contextlib.nullcontext()
    with heap:
        return _train(model, batches, cfg, Path(out_dir), device, loss_fn, tokenizer, resume, hparams, sample_fn,
                      on_step, perplexity, loss_label)


def _train(model, batches: BatchSource, cfg: TrainConfig, out_dir: Path, device: torch.device, loss_fn, tokenizer,
           resume: bool, hparams: dict | None, sample_fn, on_step, perplexity: bool, loss_label: str) -> TrainResult:
    from tqdm.auto import tqdm

    amp_dtype = autocast_dtype(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg, device)
    hparams = {"train": dataclasses.asdict(cfg), **(hparams or {})}

    step, tokens = 0, 0
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise UserError(f"--resume: no checkpoint with {TRAIN_STATE} under {out_dir / 'checkpoints'}; "
                            "start without --resume")
        from llmscratch.checkpoint import check_state_dict, load_state_dict
        state = load_state_dict(ckpt / "model.safetensors", device=device)
        check_state_dict(model, state, str(ckpt))
        model.load_state_dict(state, strict=False)
        ts = load_train_state(ckpt)
        optimizer.load_state_dict(ts["optimizer"])
        batches.load_state_dict(ts["data"])
        _set_rng_state(ts["rng"])
        step, tokens = int(ts["step"]), int(ts["tokens"])
    metrics = MetricsLog(out_dir, resume_from_step=step if resume else None)
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    set_model_options(model, cfg, device)
    fwd_model = torch.compile(model) if use_compile else model
    flops_tok = flops_per_token(model.config) if hasattr(model, "config") else None
    peak = peak_flops(device, cfg.peak_tflops)

    result = TrainResult(step=step, tokens=tokens)
    start = time.perf_counter()
    window_t, window_tokens = start, 0
    running = torch.zeros((), device=device)
    running_extras: dict[str, torch.Tensor] = {}  # loss_fn's extra scalars, summed like `running`
    running_n = 0
    last_saved = step
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not cfg.progress, desc="train", unit="step",
               dynamic_ncols=True)
    compiling = use_compile  # the first step compiles the model: tens of seconds with the bar standing still
    if compiling:
        bar.set_postfix_str("compiling the model (torch.compile) in the first step")

    def save(at_step: int) -> Path:
        return save_checkpoint(out_dir, model, tokenizer, optimizer, at_step, tokens, batches, hparams,
                               cfg.keep_last)

    try:
        with _StopFlag() as stop:
            while step < cfg.max_steps:
                lr = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                for _ in range(cfg.grad_accum):
                    batch = batches.next("train")
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss, n, extras = unpack_loss(loss_fn(fwd_model, batch))
                    (loss / cfg.grad_accum).backward()
                    running += loss.detach() / cfg.grad_accum
                    for k, v in extras.items():
                        v = torch.as_tensor(v, device=device).detach().float() / cfg.grad_accum
                        running_extras[k] = running_extras[k] + v if k in running_extras else v
                    tokens += n
                    window_tokens += n
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                running_n += 1
                if compiling:
                    bar.set_postfix_str("")
                    compiling = False
                bar.update(1)

                last = step == cfg.max_steps
                out_of_time = cfg.max_minutes is not None and time.perf_counter() - start > cfg.max_minutes * 60
                stopping = last or out_of_time or stop.requested
                saving = step % cfg.save_every == 0 or stopping
                # Losses are read back (a host sync) only when logging, and always before a save so that a
                # non-finite loss never reaches a checkpoint.
                if step % cfg.log_every == 0 or saving:
                    train_loss = float(running) / running_n  # the only host sync in the loop
                    extra_means = {f"train_{k}": float(v) / running_n for k, v in running_extras.items()}
                    running.zero_()
                    running_extras.clear()
                    running_n = 0
                    if not math.isfinite(train_loss):
                        good = latest_checkpoint(out_dir)
                        where = f"last good checkpoint: {good}" if good else "no checkpoint was written yet"
                        raise TrainingDiverged(f"loss became {train_loss} at step {step}; stopping ({where}). "
                                               "Lower --lr or raise --warmup-steps and retry")
                    now = time.perf_counter()
                    tok_s = window_tokens / max(now - window_t, 1e-9)
                    window_t, window_tokens = now, 0
                    mfu = tok_s * flops_tok / peak if (peak and flops_tok) else None
                    metrics.log("train", step, tokens=tokens, elapsed_s=round(now - start, 2), lr=lr,
                                train_loss=train_loss, tokens_per_s=round(tok_s, 1), mfu=mfu, **extra_means)
                    result.train_loss = train_loss
                    postfix = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.1e}", "tok/s": f"{tok_s:,.0f}"}
                    if mfu is not None:
                        postfix["mfu"] = f"{mfu:.1%}"
                    bar.set_postfix(postfix)
                    if on_step is not None:
                        on_step(step, train_loss)
                elif on_step is not None:
                    on_step(step, None)

                if step % cfg.eval_every == 0 or stopping:
                    ev = evaluate(model, batches, loss_fn, cfg.eval_batches, amp_dtype, device)
                    ev_extras = {k: v for k, v in ev.items() if k not in ("train", "val")}
                    val_ppl = math.exp(min(ev["val"], 50.0)) if perplexity else None
                    metrics.log("eval", step, tokens=tokens, elapsed_s=round(time.perf_counter() - start, 2),
                                lr=lr, train_loss=ev["train"], val_loss=ev["val"], val_ppl=val_ppl, **ev_extras)
                    result.val_loss = ev["val"]
                    result.history.append({"step": step, "train": ev["train"], "val": ev["val"], **ev_extras})
                    shown = "".join(f", {k} {v:.3f}" for k, v in ev_extras.items() if k.startswith("val_"))
                    ppl = f" (perplexity {val_ppl:.1f})" if perplexity else ""
                    bar.write(f"step {step}: train loss {ev['train']:.3f}, val loss {ev['val']:.3f}{ppl}{shown}")
                    if not math.isfinite(ev["val"]):
                        raise TrainingDiverged(f"validation loss became {ev['val']} at step {step}; stopping. "
                                               "Lower --lr and retry")
                if sample_fn is not None and cfg.sample_every and step % cfg.sample_every == 0:
                    bar.write(f"sample @ {step}: {sample_fn(model)!r}")
                if saving or stop.requested:  # a Ctrl-C during on_step still saves this step
                    save(step)
                    last_saved = step
                if out_of_time or stop.requested:
                    result.stopped_early = "time" if out_of_time else "interrupt"
                    break
    finally:
        bar.close()
        metrics.close()
    result.step, result.tokens = step, tokens
    if last_saved == step:
        save_model(out_dir, model, tokenizer, hparams)
        plot_losses(out_dir / "metrics.csv", out_dir / "loss.png", ylabel=loss_label)
    return result
