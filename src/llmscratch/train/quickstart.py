"""The offline quickstart: the embedded pydocs corpus → a BPE tokenizer → token files → a small GPT trained for a
time budget, reported against the corpus's unigram cross-entropy.

The run is planned from this machine's measured speed, not from a fixed step count:

* `plan` picks the model. Every candidate is timed for a few steps; the largest one that makes at least
  `MIN_EPOCHS` passes over the corpus within the budget is trained (the smallest when none does), because on a
  corpus this small a bigger model learns more per token but loses when it sees the text too few times.
* `BudgetSchedule` re-plans while it runs: the cosine's length is re-estimated at every step from the speed
  reached so far, so the learning rate has decayed when the budget runs out, however the machine's speed
  changes (other processes, the first slow steps).
* No plan runs past `MAX_EPOCHS` passes: beyond that the model memorises the training text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmscratch import runs
from llmscratch.config import PRESETS, ModelConfig
from llmscratch.errors import UserError
from llmscratch.runtime import autocast_dtype, cpu_memory_kept_for_reuse, resolve_device
from llmscratch.train.pretrain import LMBatches, prepare, sample_fn, unigram_cross_entropy
from llmscratch.train.schedule import lr_at
from llmscratch.train.trainer import TrainConfig, TrainResult, build_optimizer, lm_loss, train

CANDIDATES = ("gpt-tiny", "gpt-mini")  # what `--model auto` chooses from, smallest first
# Passes over the corpus at which a larger model starts to pay for its slower steps. Between the measured
# points in benchmarks/RESULTS.md: gpt-mini with 1.6-1.8 passes ended 0.6-0.9 nats behind gpt-tiny with 4.4-6;
# a 12M model with ~4 passes ended below gpt-tiny's best at 6.
MIN_EPOCHS = 3.0
# Past ~6 passes over this 0.37M-token corpus validation loss stops falling and then climbs (memorisation;
# benchmarks/RESULTS.md, the H200 quickstart).
MAX_EPOCHS = 6.0
BATCH_SIZE = 16  # sequences per step
PROMPT = "The module"


@dataclass(frozen=True)
class Plan:
    """What a time-budgeted run trains and for how long, and why (`reason`, one sentence for the user)."""

    model: str
    tokens_per_s: float
    steps: int  # expected steps within the budget at the measured speed, at most `cap_steps`
    cap_steps: int  # MAX_EPOCHS passes over the corpus
    epochs: float  # passes over the corpus the budget buys at that speed (before the cap)
    reason: str


def epochs_in(tokens_per_s: float, budget_s: float, corpus_tokens: int) -> float:
    """Passes over a `corpus_tokens` corpus that `budget_s` seconds at `tokens_per_s` buy."""
    return tokens_per_s * budget_s / corpus_tokens


def plan(tokens_per_s: dict[str, float], budget_s: float, corpus_tokens: int, step_tokens: int,
         forced: str | None = None) -> Plan:
    """Choose the model to train from the measured `tokens_per_s` of the candidates, smallest first (those larger
    than the first one found too slow may be missing: they were not timed): `forced` if given, else the largest
    one making at least MIN_EPOCHS passes over the corpus in `budget_s`, else the smallest. Its steps are those
    the budget buys at its speed, capped at MAX_EPOCHS passes (at least 1). `step_tokens`: tokens per step."""
    names = list(tokens_per_s)
    passes = {m: epochs_in(tokens_per_s[m], budget_s, corpus_tokens) for m in names}

    def described(m: str) -> str:
        return f"{m} {tokens_per_s[m]:,.0f} tok/s → {_passes(passes[m])} passes"

    enough = [m for m in names if passes[m] >= MIN_EPOCHS]
    if forced is not None:
        model, why = forced, f"chosen with --model ({described(forced)} over the corpus in the budget)"
    elif enough:
        model = enough[-1]
        why = (f"the largest model that makes at least {MIN_EPOCHS:g} passes over the corpus in the budget "
               f"(measured: {'; '.join(described(m) for m in names)})")
        if model != names[-1]:
            why += "; a larger model would see the text too few times to beat it"
    else:
        model = names[0]
        why = (f"the smallest model: even it makes only {_passes(passes[model])} of the {MIN_EPOCHS:g} passes over the "
               f"corpus that a larger model would need to pay for its slower steps (measured: {described(model)})")
    cap = max(1, int(MAX_EPOCHS * corpus_tokens / step_tokens))
    steps = max(1, min(cap, int(tokens_per_s[model] * budget_s / step_tokens)))
    if passes[model] > MAX_EPOCHS:
        why += (f"; it stops after {MAX_EPOCHS:g} passes ({cap} steps), before the budget ends: more passes over "
                "this small corpus would only memorise it")
    return Plan(model, tokens_per_s[model], steps, cap, passes[model], why)


def _passes(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def replanned_steps(step: int, elapsed_s: float, budget_s: float, planned: int, cap: int, settle: int = 10) -> int:
    """The run's total steps re-estimated after `step` steps in `elapsed_s` of a `budget_s` budget: the steps the
    whole budget allows at the average speed so far (the first `settle` steps use the `planned` total), never
    fewer than step + 1 and never more than `cap`."""
    if step < settle or elapsed_s <= 0:
        return min(planned, cap)
    return max(step + 1, min(cap, int(step * budget_s / elapsed_s)))


class BudgetSchedule:
    """The learning rate of each step of a time-budgeted run (`train(lr_schedule=...)`): cfg's linear warmup, then
    a cosine to cfg.min_lr_ratio × lr over the total steps that `replanned_steps` expects, measured by `clock`
    from the first step. The trainer's own `max_minutes` ends the run."""

    def __init__(self, cfg: TrainConfig, budget_s: float, planned: int, cap: int, clock=time.perf_counter):
        self.cfg, self.budget_s, self.planned, self.cap, self.clock = cfg, budget_s, planned, cap, clock
        self.started: float | None = None
        self.total = min(planned, cap)  # the latest estimate, for the report

    def __call__(self, step: int) -> float:
        now = self.clock()
        if self.started is None:
            self.started = now
        self.total = replanned_steps(step, now - self.started, self.budget_s, self.planned, self.cap)
        cfg = self.cfg
        return lr_at(step, cfg.lr, cfg.warmup_steps, self.total, cfg.min_lr_ratio)


def measure_tokens_per_s(model_cfg: ModelConfig, cfg: TrainConfig, steps: int = 2) -> float:
    """Training tokens per second of a fresh `model_cfg` model: the fastest of `steps` full optimizer steps
    (forward, backward, AdamW) after one warm-up, on random tokens, at cfg's device, precision and batch size.
    The fastest, because other processes slow random steps, and candidates are compared with each other."""
    from llmscratch.model import GPT

    device = resolve_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device)
    model = GPT(model_cfg).to(device).train()
    optimizer = build_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model_cfg.vocab_size, (cfg.batch_size, model_cfg.context_length + 1), generator=gen)
    batch = (x[:, :-1].to(device), x[:, 1:].to(device))
    times = []
    with cpu_memory_kept_for_reuse() if device.type == "cpu" else contextlib.nullcontext():
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss, n = lm_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return n / min(times[1:])


def choose_model(model: str, vocab_size: int, cfg: TrainConfig, budget_s: float, corpus_tokens: int) -> Plan:
    """Measure the candidates (only `model` unless it is `auto`) and `plan` the run. Candidates are timed
    smallest first, and timing stops at the first one too slow for MIN_EPOCHS passes: larger ones are slower."""
    names = CANDIDATES if model == "auto" else (model,)
    speeds: dict[str, float] = {}
    step_tokens = 0
    for name in names:
        model_cfg = ModelConfig.from_preset(name, vocab_size=vocab_size)
        step_tokens = cfg.batch_size * model_cfg.context_length
        speeds[name] = measure_tokens_per_s(model_cfg, cfg)
        if epochs_in(speeds[name], budget_s, corpus_tokens) < MIN_EPOCHS:
            break
    return plan(speeds, budget_s, corpus_tokens, step_tokens, forced=None if model == "auto" else model)


def quickstart(out: str | Path = "runs/quickstart", minutes: float = 4.0, vocab_size: int = 4096,
               model: str = "auto", device: str = "auto", seed: int = 1337, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Offline end to end: train a BPE tokenizer on the embedded `pydocs` corpus, pretrain a GPT for `minutes`
    (the model `auto` picks from CANDIDATES by measured speed, or a preset), and report the validation loss next
    to the corpus's unigram cross-entropy. `overwrite` lets `out` be a non-empty folder, replacing only the files
    the quickstart writes. Returns val_loss, unigram, model, steps, tokens, minutes (all of it) and
    train_minutes (the pretraining, whose budget `minutes` is)."""
    out = Path(out)
    if not (minutes > 0 and math.isfinite(minutes)):
        raise UserError(f"--minutes {minutes}: must be a positive number of minutes, e.g. 4")
    if model != "auto" and model not in PRESETS:
        raise UserError(f"--model {model}: use auto or one of the presets {', '.join(PRESETS)}")
    if runs.check_run_folder(out, resume=False, overwrite=overwrite, resumable=False):
        runs.clear_run(out)
    t0 = time.perf_counter()
    # A failure before the first checkpoint removes what this run added to `out`.
    with runs.removed_on_failure(out, runs.check_out_dir(out)):
        tok, data_dir, meta, unigram = _quickstart_data(out, vocab_size, seed, progress)
        chosen, result, train_min = _pretrain(out, tok, data_dir, meta.train_tokens, minutes, model, device, seed,
                                              progress)
    total_min = (time.perf_counter() - t0) / 60
    _quickstart_report(out, result, unigram, total_min, train_min, minutes)
    return {"val_loss": result.val_loss, "unigram": unigram, "model": chosen.model, "steps": result.step,
            "tokens": result.tokens, "minutes": total_min, "train_minutes": train_min,
            "stopped_early": result.stopped_early}


def _pretrain(out: Path, tok, data_dir: Path, corpus_tokens: int, minutes: float, model: str, device: str,
              seed: int, progress: bool) -> tuple[Plan, TrainResult, float]:
    """Step 4 within the `minutes` budget: measure, choose the model, train it with a re-planned schedule;
    returns (the plan, the training result, the minutes it took). Samples are printed before and after."""
    from llmscratch.generate import generate
    from llmscratch.model import GPT

    started, budget_s = time.perf_counter(), minutes * 60
    dev = resolve_device(device)
    cfg = _train_config(dev, device, seed, progress)
    print("[4/4] measuring this machine's training speed to choose the model and its steps...", flush=True)
    chosen = choose_model(model, tok.vocab_size, cfg, budget_s, corpus_tokens)
    model_cfg = ModelConfig.from_preset(chosen.model, vocab_size=tok.vocab_size)
    torch.manual_seed(seed)
    net = GPT(model_cfg)
    print(f"      model: {chosen.model} ({net.num_params() / 1e6:.1f}M parameters): {chosen.reason}", flush=True)
    before = generate(net, tok, PROMPT, max_new_tokens=30, temperature=0.8, top_k=40, seed=seed)
    print(f"      sample before training: {PROMPT}{before!r}", flush=True)
    # The trainer stops after the step that passes max_minutes, then evaluates once more and saves: leave
    # room for that evaluation (forward passes only, ~3x a training step's speed) and the save.
    final_s = 2 * cfg.eval_batches * cfg.batch_size * model_cfg.context_length / (3 * chosen.tokens_per_s) + 1.0
    train_s = max(budget_s - (time.perf_counter() - started) - final_s, 1.0)
    # Warmup is at most a fifth of the run: on a slow machine 20 warmup steps would be most of it.
    cfg = dataclasses.replace(cfg, max_steps=chosen.cap_steps, max_minutes=train_s / 60,
                              warmup_steps=min(cfg.warmup_steps, max(1, chosen.steps // 5)))
    print(f"      pretraining on {dev.type} in {cfg.precision} for the remaining ~{train_s / 60:.1f} min (~"
          f"{chosen.steps} steps of {cfg.batch_size}×{model_cfg.context_length} tokens at the measured speed; "
          "re-planned as it runs)...", flush=True)
    batches = LMBatches(data_dir, cfg.batch_size, model_cfg.context_length, seed, dev)
    result = train(net, batches, cfg, out, tokenizer=tok,
                   lr_schedule=BudgetSchedule(cfg, train_s, chosen.steps, chosen.cap_steps),
                   hparams={"model": chosen.model, "data": "pydocs", "data_dir": str(data_dir)},
                   sample_fn=sample_fn(tok, PROMPT, seed=seed))
    train_min = (time.perf_counter() - started) / 60
    after = generate(net, tok, PROMPT, max_new_tokens=40, temperature=0.8, top_k=40, seed=seed)
    print(f"\nsample after training: {PROMPT}{after!r}")
    return chosen, result, train_min


def _train_config(dev: torch.device, device: str, seed: int, progress: bool) -> TrainConfig:
    """The quickstart's settings; steps and minutes are filled in once the run is planned."""
    precision = "bf16" if autocast_dtype("auto", dev) else "fp32"
    return TrainConfig(batch_size=BATCH_SIZE, lr=2e-3 if dev.type == "cpu" else 1e-3, warmup_steps=20,
                       weight_decay=0.1, eval_every=50, eval_batches=8, log_every=10, save_every=100,
                       keep_last=1, seed=seed, device=device, precision=precision, progress=progress)


def _quickstart_data(out: Path, vocab_size: int, seed: int, progress: bool):
    """Steps 1-3: the embedded corpus, a BPE tokenizer trained on it, and its token files; returns (tokenizer,
    token folder, their meta, the unigram cross-entropy of the validation split)."""
    from llmscratch.data import load_corpus
    from llmscratch.tokenizer import BPETokenizer, load_tokenizer

    print("[1/4] loading the embedded corpus (Python standard library docs)...", flush=True)
    documents = load_corpus("pydocs", progress=progress)
    size_mb = sum(len(d) for d in documents) / 1e6
    print(f"      {len(documents):,} documents, {size_mb:.2f} MB of text", flush=True)
    print(f"[2/4] training a {vocab_size}-token byte-level BPE tokenizer from scratch...", flush=True)
    bpe = BPETokenizer.train(documents, vocab_size, progress=progress)
    bpe.save(out / "tokenizer")
    tok = load_tokenizer(out / "tokenizer")  # the tiktoken-backed fast path of the same vocabulary
    print("[3/4] tokenizing into train/val token files...", flush=True)
    data_dir = out / runs.DATA
    meta = prepare("pydocs", tok, data_dir, val_fraction=0.1, seed=seed, progress=progress)
    unigram = unigram_cross_entropy(data_dir)
    print(f"      {meta.train_tokens:,} train / {meta.val_tokens:,} val tokens; unigram cross-entropy "
          f"{unigram:.3f} nats (the loss of a model that ignores context)", flush=True)
    return tok, data_dir, meta, unigram


def _quickstart_report(out: Path, result: TrainResult, unigram: float, total_min: float, train_min: float,
                       budget_min: float) -> None:
    val = result.val_loss
    verdict = (f"{unigram - val:.2f} nats better: it learned to use context" if val < unigram
               else f"not below it ({val - unigram:.2f} nats above): train longer, e.g. --minutes 8")
    print(f"final validation loss {val:.3f} nats (perplexity {math.exp(val):.1f}) vs unigram cross-entropy "
          f"{unigram:.3f}: {verdict}")
    print(f"done in {total_min:.1f} min (pretraining {train_min:.1f} of its {budget_min:g}): {result.step} steps, "
          f"{result.tokens:,} tokens. Files in {out}/: {', '.join(runs.written_files(out))}")
    print("\nnext, try:")
    print(f'  llmscratch generate {out} --prompt "{PROMPT}" --max-new-tokens 60 --temperature 0.8 --top-k 40')
    print(f"  llmscratch info {out}")
    print(f"  llmscratch pretrain --model gpt-mini --data tinyshakespeare --tokenizer {out} --out runs/shakespeare")
