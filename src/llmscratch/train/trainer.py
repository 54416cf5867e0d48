"""The one training loop. Pretraining and every fine-tuning stage call `train` with their own loss and data.

A stage supplies:
  * `batches`: a `BatchSource` — `next("train")` gives the next training batch; `next("eval_train")` and
    `next("eval_val")` give evaluation batches, which must repeat after `reset_eval()` so evaluations are
    comparable; `state_dict()` captures the data position so `--resume` continues with the very next batch;
  * `loss_fn(model, batch) -> (loss, n_tokens)`: the mean loss and how many tokens it covered. It may also
    return a third item, a dict of extra scalars (e.g. DPO's rewards): the trainer averages each over the
    batches of a logging window and of an evaluation, like the loss, and logs them as `train_<name>` and
    `val_<name>` columns of the run's metrics CSV.

The loop itself (`_Run.loop`) follows the book's `train_model_simple`; the run folder it writes is laid out
by `llmscratch.runs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from llmscratch import runs
from llmscratch.checkpoint import save_model
from llmscratch.errors import UserError
from llmscratch.fileio import atomic_write
from llmscratch.model.transformer import flops_per_token
from llmscratch.runs import TRAIN_STATE, latest_checkpoint  # noqa: F401 (re-exported: the stages import them here)
from llmscratch.runtime import autocast_dtype, cpu_memory_kept_for_reuse, peak_flops, tf32_matmuls
from llmscratch.train import distributed, fp8
from llmscratch.train.config import TrainConfig
from llmscratch.train.distributed import Ranks
from llmscratch.train.metrics import MetricsLog, plot_losses
from llmscratch.train.schedule import lr_at


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


def lm_loss(model, batch) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, dict]:
    """Next-token cross-entropy over every position of (x, y) batches (the book's calc_loss_batch).

    The model computes it with its fused LM-head loss; `F.cross_entropy(model(x).flatten(0, 1), y.flatten())`
    is the same number (tests/model/test_loss.py). A mixture-of-experts model in training mode adds its
    router's load-balancing loss times `router_aux_loss_coef` and reports that loss as the extra "aux_loss"."""
    x, y = batch
    loss = model(x, targets=y)
    inner = getattr(model, "module", model)  # inside a DDP wrapper (torch.compile's passes attributes through)
    aux = inner.aux_loss() if hasattr(inner, "aux_loss") else None
    if aux is None:
        return loss, y.numel()
    return loss + inner.config.router_aux_loss_coef * aux, y.numel(), {"aux_loss": aux.detach()}


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
    if hasattr(model, "set_options"):
        low_precision = cfg.bf16_residual if cfg.bf16_residual is not None else device.type == "cuda"
        model.set_options(activation_checkpointing=cfg.activation_checkpointing,
                          low_precision_residual=low_precision)


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


def save_checkpoint(out_dir: Path, model, tokenizer, optimizer, step: int, tokens: int, batches: BatchSource,
                    hparams: dict, keep_last: int, ranks: Ranks = distributed.SINGLE, sharded: bool = False) -> Path:
    """Write the run's step folder for `step` atomically (`runs.new_step_folder`: a temporary folder renamed
    into place), with the training state that `--resume` restores, then prune all but the `keep_last` newest.
    Every rank calls it. Rank 0 writes the folder; the weights and optimizer state are either gathered whole
    into it (one process, DDP), or, `sharded` (FSDP2), written by every rank as its own pieces into the folder's
    `sharded/` (llmscratch.sharded)."""
    from llmscratch import sharded as shards

    state = {"step": step, "tokens": tokens, "rng": _rng_state(), "data": batches.state_dict()}
    if not sharded:
        weights, state["optimizer"] = distributed.full(model.state_dict()), distributed.full(optimizer.state_dict())
    with runs.new_step_folder(out_dir, step) if ranks.main else contextlib.nullcontext() as tmp:
        if sharded:  # every rank writes its shards into rank 0's temporary folder (on a shared file system)
            tmp = Path(distributed.from_main(str(tmp), ranks))
            state["optimizer_groups"] = shards.save(tmp / runs.SHARDED, model, optimizer)
        if ranks.main:
            save_model(tmp, model, tokenizer, hparams, state=None if sharded else weights, weights=not sharded)
            atomic_write(tmp / runs.TRAIN_STATE, lambda p: torch.save(state, p))  # (a full disk: one clear OSError)
    if ranks.main:
        runs.prune_checkpoints(out_dir, keep_last)
    return runs.step_folder(out_dir, step)


def load_train_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / runs.TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one
        raise UserError(f"{ckpt / runs.TRAIN_STATE}: cannot read training state ({exc}); "
                        "delete this checkpoint folder to resume from an earlier one") from None


def restore_weights(out_dir: Path, model, device: torch.device) -> Path:
    """Load the weights of the run's newest resumable checkpoint into `model` (whole, before any sharding);
    returns that checkpoint's folder for `restore_state`. A sharded checkpoint's weights are read later, by
    `restore_state`, once the model is sharded as this run shards it."""
    from llmscratch.checkpoint import check_state_dict, load_state_dict

    ckpt = runs.latest_checkpoint(out_dir)
    if ckpt is None:
        raise UserError(f"--resume: no checkpoint with {runs.TRAIN_STATE} under {out_dir / runs.CHECKPOINTS}; "
                        "start without --resume")
    if (ckpt / runs.SHARDED).is_dir():
        return ckpt
    state = load_state_dict(ckpt / runs.WEIGHTS, device=device)
    check_state_dict(model, state, str(ckpt))
    model.load_state_dict(state, strict=False)
    return ckpt


def restore_state(ckpt: Path, model, optimizer, batches: BatchSource) -> tuple[int, int]:
    """Load the optimizer, data position and RNGs of checkpoint `ckpt` (and, from a sharded checkpoint, the
    weights too: each rank the pieces it holds), so that training continues exactly as if never stopped, on any
    number of processes; returns its (step, tokens)."""
    from llmscratch import sharded

    ts = load_train_state(ckpt)
    if (ckpt / runs.SHARDED).is_dir():
        sharded.load(ckpt / runs.SHARDED, model, optimizer, ts.get("optimizer_groups"))
    else:
        optimizer.load_state_dict(distributed.shard_optimizer_state(ts["optimizer"], optimizer))
    batches.load_state_dict(ts["data"])
    _set_rng_state(ts["rng"])
    return int(ts["step"]), int(ts["tokens"])


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
def evaluate(model, batches: BatchSource, loss_fn, n_batches: int, amp_dtype, device,
             ranks: Ranks = distributed.SINGLE) -> dict[str, float]:
    """Mean loss over the same `n_batches` of each split every time (the source resets its eval stream):
    {"train": loss, "val": loss}, plus "train_<name>" and "val_<name>" for each extra scalar of `loss_fn`.
    With several ranks each scores its share of every batch, and the means are averaged across them."""
    was_training = model.training
    model.eval()
    batches.reset_eval()
    out = {}
    for split in ("train", "val"):
        total, extra_totals = 0.0, {}
        for _ in range(n_batches):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, _, extras = unpack_loss(loss_fn(model, distributed.shard(batches.next(f"eval_{split}"),
                                                                               ranks)))
            total += float(distributed.mean(loss.float(), ranks))
            for k, v in extras.items():
                extra_totals[k] = extra_totals.get(k, 0.0) + float(distributed.mean(
                    torch.as_tensor(v, device=device).float(), ranks))
        out[split] = total / max(1, n_batches)
        out.update({f"{split}_{k}": v / max(1, n_batches) for k, v in extra_totals.items()})
    model.train(was_training)
    return out


def train(model, batches: BatchSource, cfg: TrainConfig, out_dir: str | Path, loss_fn=lm_loss, tokenizer=None,
          resume: bool = False, hparams: dict | None = None,
          sample_fn: Callable[[torch.nn.Module], str] | None = None,
          on_step: Callable[[int, float | None], None] | None = None, perplexity: bool = True,
          loss_label: str = "cross-entropy loss (nats)",
          lr_schedule: Callable[[int], float] | None = None) -> TrainResult:
    """Train `model` on `batches` and write checkpoints, metrics and plots under `out_dir`.

    `on_step(step, loss)` is called after every step: with the window's mean training loss on logging steps,
    None otherwise. `sample_fn(model)` is printed every `cfg.sample_every` steps. `perplexity`: report
    exp(val loss) — meaningful for next-token losses only (classification and DPO turn it off); `loss_label`
    names the loss on the loss plot's y-axis. `lr_schedule(step)`: the learning rate of each step, in place of
    cfg's warmup and cosine over max_steps (`schedule.lr_at`), e.g. one stretched to a time budget."""
    cfg.check()
    ranks, device = distributed.setup(cfg.device)  # one process: the device cfg names
    if device.type == "mps" and cfg.compile:  # what MPS lacks ends in one line, before the run starts
        raise UserError("--train.compile true: torch.compile is not supported on MPS (Apple GPUs); leave it off")
    # Process-wide settings last exactly as long as training. On a CPU the run keeps freed memory for its next
    # steps (runtime.cpu_memory_kept_for_reuse); the loop's own tensors — optimizer state, gradients — are
    # freed inside, so the trim on leaving returns them. On CUDA fp32 matrix products use TF32.
    heap = cpu_memory_kept_for_reuse() if device.type == "cpu" and cfg.cpu_heap_reuse else contextlib.nullcontext()
    tf32 = tf32_matmuls() if device.type == "cuda" else contextlib.nullcontext()
    # --train.precision fp8: the blocks' linears are torchao's Float8Linear while training, plain ones after
    fp8_linears = fp8.converted(model, device) if cfg.precision == "fp8" else contextlib.nullcontext()
    with heap, tf32, fp8_linears:
        return _train(model, batches, cfg, Path(out_dir), device, loss_fn, tokenizer, resume, hparams, sample_fn,
                      on_step, perplexity, loss_label, lr_schedule, ranks)


def _train(model, batches: BatchSource, cfg: TrainConfig, out_dir: Path, device: torch.device, loss_fn, tokenizer,
           resume: bool, hparams: dict | None, sample_fn, on_step, perplexity: bool, loss_label: str,
           lr_schedule: Callable[[int], float] | None, ranks: Ranks = distributed.SINGLE) -> TrainResult:
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    ckpt = restore_weights(out_dir, model, device) if resume else None
    set_model_options(model, cfg, device)
    # Several ranks: DDP, or FSDP2 sharding `model` in place — before the optimizer sees its parameters.
    stepped = distributed.wrap(model, device, ranks, cfg.strategy, autocast_dtype(cfg.precision, device))
    optimizer = build_optimizer(model, cfg, device)
    hparams = {"train": dataclasses.asdict(cfg), **(hparams or {})}
    step, tokens = restore_state(ckpt, model, optimizer, batches) if resume else (0, 0)
    metrics = MetricsLog(out_dir, resume_from_step=step if resume else None) if ranks.main else _NoMetrics()
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    sharded = ranks.active and cfg.strategy == "fsdp"  # then generating a sample would need every rank
    run = _Run(cfg, out_dir, model, torch.compile(stepped) if use_compile else stepped, optimizer, batches, loss_fn,
               device, tokenizer, hparams, metrics, sample_fn if ranks.main and not sharded else None, on_step,
               perplexity, step, tokens, use_compile, lr_schedule, ranks)
    try:
        run.loop()
    finally:
        run.bar.close()
        metrics.close()
    if run.last_saved == run.step:  # the final model and plot only when the last step was saved
        weights = distributed.full(model.state_dict())  # (every rank: gathering shards is a collective)
        if ranks.main:
            save_model(out_dir, model, tokenizer, hparams, state=weights)
            plot_losses(out_dir / runs.METRICS_CSV, out_dir / runs.LOSS_PLOT, ylabel=loss_label)
    distributed.barrier(ranks)  # the other ranks return once the final files are written
    return run.result


class _NoMetrics:
    """The metrics of a rank other than 0: rank 0 alone writes the run's metrics.csv."""

    def log(self, kind: str, step: int, **values) -> None:
        pass

    def close(self) -> None:
        pass


class _Window:
    """The running sums of one logging window. They stay on the device, so adding to them never waits for the
    accelerator; `means` reads them back (a host sync) and `restart` begins the next window."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.extras: dict[str, torch.Tensor] = {}  # loss_fn's extra scalars, summed like the loss
        self.steps, self.tokens = 0, 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor, extras: dict, n_tokens: int, grad_accum: int) -> None:
        """One micro-batch's loss and extras, as its share (1 / grad_accum) of its step's."""
        self.loss += loss.detach() / grad_accum
        for k, v in extras.items():
            v = torch.as_tensor(v, device=self.device).detach().float() / grad_accum
            self.extras[k] = self.extras[k] + v if k in self.extras else v
        self.tokens += n_tokens

    def means(self, ranks: Ranks = distributed.SINGLE) -> tuple[float, dict[str, float]]:
        """The window's mean loss per step and its extras' means as {"train_<name>": mean}, averaged across
        `ranks` when several train."""
        loss = float(distributed.mean(self.loss, ranks)) / self.steps  # the loop's only host sync
        return loss, {f"train_{k}": float(distributed.mean(v, ranks)) / self.steps for k, v in self.extras.items()}

    def restart(self, now: float) -> float:
        """Empty the window and start the next one at `now`; returns the tokens per second of the one ended."""
        tokens_per_s = self.tokens / max(now - self.started, 1e-9)
        self.loss.zero_()
        self.extras.clear()
        self.steps, self.tokens, self.started = 0, 0, now
        return tokens_per_s


@dataclass
class _Run:
    """One training run: what it trains (fixed) and the loop's mutable state — step and token counts, the
    logging window, the result so far and the progress bar — with the parts of the loop as methods."""

    cfg: TrainConfig
    out_dir: Path
    model: torch.nn.Module
    fwd_model: torch.nn.Module  # the model, or its torch.compile wrapper: used for training steps
    optimizer: torch.optim.Optimizer
    batches: BatchSource
    loss_fn: Callable
    device: torch.device
    tokenizer: Any
    hparams: dict
    metrics: MetricsLog
    sample_fn: Callable[[torch.nn.Module], str] | None
    on_step: Callable[[int, float | None], None] | None
    perplexity: bool
    step: int
    tokens: int
    compiling: bool  # until the first step ends: torch.compile makes it take tens of seconds
    lr_schedule: Callable[[int], float] | None = None  # step -> lr; None: lr_at over cfg.max_steps
    ranks: Ranks = distributed.SINGLE  # this process among torchrun's; rank 0 alone logs, shows progress and saves

    def __post_init__(self):
        from tqdm import tqdm

        self.amp_dtype = autocast_dtype(self.cfg.precision, self.device)
        self.flops_per_token = flops_per_token(self.model.config) if hasattr(self.model, "config") else None
        self.peak_flops = peak_flops(self.device, self.cfg.peak_tflops)
        self.result = TrainResult(step=self.step, tokens=self.tokens)
        self.last_saved = self.step
        self.lr = self.cfg.lr
        self.start = time.perf_counter()
        self.window = _Window(self.device)
        shown = self.cfg.progress and self.ranks.main
        self.bar = tqdm(total=self.cfg.max_steps, initial=self.step, disable=not shown, desc="train", unit="step",
                        dynamic_ncols=True)
        if self.compiling:
            self.bar.set_postfix_str("compiling the model (torch.compile) in the first step")

    def loop(self) -> None:
        """The book's train_model_simple: train a step; every log_every steps log the training loss, every
        eval_every evaluate, every save_every save — and at the last step all three. The first Ctrl-C, or
        running past max_minutes, ends the run at the step boundary, saved."""
        cfg = self.cfg
        with _StopFlag() as stop:
            while self.step < cfg.max_steps:
                self.train_step()
                out_of_time = cfg.max_minutes is not None and time.perf_counter() - self.start > cfg.max_minutes * 60
                # every rank stops at the same step: when any of them was interrupted or ran out of time
                out_of_time, stop.requested = distributed.any_of([out_of_time, stop.requested], self.device,
                                                                 self.ranks)
                stopping = self.step == cfg.max_steps or out_of_time or stop.requested
                saving = self.step % cfg.save_every == 0 or stopping
                # The loss is read back only when logging, and always before a save, so that a non-finite
                # loss never reaches a checkpoint.
                loss = self.log() if self.step % cfg.log_every == 0 or saving else None
                if self.on_step is not None:
                    self.on_step(self.step, loss)
                if self.step % cfg.eval_every == 0 or stopping:
                    self.evaluate_and_log()
                if self.sample_fn is not None and cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.bar.write(f"sample @ {self.step}: {self.sample_fn(self.model)!r}")
                if saving or stop.requested:  # a Ctrl-C during on_step still saves this step
                    self.save()
                if out_of_time or stop.requested:
                    self.result.stopped_early = "time" if out_of_time else "interrupt"
                    break
        self.result.step, self.result.tokens = self.step, self.tokens

    def train_step(self) -> None:
        """One optimizer update: set the scheduled lr, forward and backward over grad_accum micro-batches,
        clip the gradients, step. The losses stay on the device."""
        cfg = self.cfg
        self.lr = (self.lr_schedule(self.step) if self.lr_schedule is not None
                   else lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        for micro in range(cfg.grad_accum):
            batch = distributed.shard(self.batches.next("train"), self.ranks)
            # gradients are averaged across ranks in the last micro-step's backward only
            with distributed.gradient_sync(self.fwd_model, micro == cfg.grad_accum - 1, self.ranks):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss, n, extras = unpack_loss(self.loss_fn(self.fwd_model, batch))
                (loss / cfg.grad_accum).backward()
            self.window.add(loss, extras, n * self.ranks.world, cfg.grad_accum)
            self.tokens += n * self.ranks.world  # (every rank's share is as large: the global batch splits evenly)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.window.steps += 1
        if self.compiling:
            self.bar.set_postfix_str("")
            self.compiling = False
        self.bar.update(1)

    def log(self) -> float:
        """Read back the window's mean training loss (raising TrainingDiverged when it is not finite), log it
        with its extras, throughput and MFU to the metrics and the progress bar, and return it."""
        train_loss, extras = self.window.means(self.ranks)
        if not math.isfinite(train_loss):
            good = runs.latest_checkpoint(self.out_dir)
            where = f"last good checkpoint: {good}" if good else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss became {train_loss} at step {self.step}; stopping ({where}). "
                                   "Lower --lr or raise --warmup-steps and retry")
        now = time.perf_counter()
        tok_s = self.window.restart(now)
        mfu = tok_s * self.flops_per_token / self.peak_flops if (self.peak_flops and self.flops_per_token) else None
        self.metrics.log("train", self.step, tokens=self.tokens, elapsed_s=round(now - self.start, 2), lr=self.lr,
                         train_loss=train_loss, tokens_per_s=round(tok_s, 1), mfu=mfu, **extras)
        self.result.train_loss = train_loss
        postfix = {"loss": f"{train_loss:.3f}", "lr": f"{self.lr:.1e}", "tok/s": f"{tok_s:,.0f}"}
        if mfu is not None:
            postfix["mfu"] = f"{mfu:.1%}"
        self.bar.set_postfix(postfix)
        return train_loss

    def evaluate_and_log(self) -> None:
        """Evaluate on the same batches as every time, log the result and print it; a non-finite validation
        loss raises TrainingDiverged."""
        ev = evaluate(self.model, self.batches, self.loss_fn, self.cfg.eval_batches, self.amp_dtype, self.device,
                      self.ranks)
        extras = {k: v for k, v in ev.items() if k not in ("train", "val")}
        val_ppl = math.exp(min(ev["val"], 50.0)) if self.perplexity else None
        self.metrics.log("eval", self.step, tokens=self.tokens, elapsed_s=round(time.perf_counter() - self.start, 2),
                         lr=self.lr, train_loss=ev["train"], val_loss=ev["val"], val_ppl=val_ppl, **extras)
        self.result.val_loss = ev["val"]
        self.result.history.append({"step": self.step, "train": ev["train"], "val": ev["val"], **extras})
        shown = "".join(f", {k} {v:.3f}" for k, v in extras.items() if k.startswith("val_"))
        ppl = f" (perplexity {val_ppl:.1f})" if self.perplexity else ""
        if self.ranks.main:
            self.bar.write(f"step {self.step}: train loss {ev['train']:.3f}, val loss {ev['val']:.3f}{ppl}{shown}")
        if not math.isfinite(ev["val"]):
            raise TrainingDiverged(f"validation loss became {ev['val']} at step {self.step}; stopping. "
                                   "Lower --lr and retry")

    def save(self) -> None:
        """A resumable checkpoint of this step: whole weights and optimizer state written by rank 0, or under FSDP
        each rank's shards (`save_checkpoint`) — the data position is the same on every rank."""
        save_checkpoint(self.out_dir, self.model, self.tokenizer, self.optimizer, self.step, self.tokens,
                        self.batches, self.hparams, self.cfg.keep_last, self.ranks,
                        sharded=self.ranks.active and self.cfg.strategy == "fsdp")
        self.last_saved = self.step
