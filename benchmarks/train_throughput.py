"""Training throughput: our GPT against Hugging Face `transformers` GPT2LMHeadModel and the book's GPTModel.

Same shapes, same data (one fixed random batch), dropout 0, the same loss (next-token cross-entropy on fp32
logits; ours computes it with its chunked fused LM-head loss, `model(x, targets=y)`), gradient clipping at
1.0 (our trainer's default) and the same optimizer for everyone: AdamW, lr 3e-4, weight decay 0.1 (ours
built by our trainer's `build_optimizer`, the others by `torch.optim.AdamW`, fused like ours unless
--plain-adamw). One timed step is forward + backward + clip + optimizer step + zero_grad; after --warmup
untimed steps, tokens/s = batch × context / the median step time on the CPU (robust to a burst of load from
other processes; the range over the steps is shown, and the fwd/bwd/optimizer columns are medians too), and
/ the mean step time of the block on CUDA.

CPU (default): 6 layers, 384 dims, 6 heads, context 256, batch 8, vocab 50257; fp32 for everyone, plus bf16
autocast for ours (our trainer's `--precision bf16`, its `auto` on CPUs with AVX512-BF16/AMX) and for
transformers. Each contender runs alone (built, warmed up, timed, freed); --schedule interleaved keeps them
all alive and lets them take turns step by step, so load from other processes hits them alike (at the cost of
a busier heap: absolute rates come out lower, most for the contenders that allocate the most).

CPU memory allocator (--heap): our trainer makes glibc keep freed memory for reuse on a CPU
(llmscratch.runtime.cpu_memory_kept_for_reuse), which spares each step page faults for its large temporaries.
It holds for the whole process while a training run lasts, so by default ("as-shipped") the peers run under
glibc's defaults, as they would run on their own, and ours after them with the setting, entered for its run
as `llmscratch pretrain` does. "default" runs everyone under glibc's defaults, "reuse" everyone with the setting
(the same-allocator comparison of the models themselves).

CUDA (--device cuda): GPT-2 124M at context 1024, bf16 autocast, batch --batch-size (16), TF32 matmuls
allowed, fused AdamW; each contender runs its steps as one block between torch.cuda.synchronize() calls.
MFU = tokens/s × training FLOPs per token (llmscratch.model.flops_per_token) / 989 TFLOP/s, the dense bf16
peak of an H100/H200 SXM (override with --peak-tflops). --compile adds torch.compile'd variants.

    .venv/bin/python benchmarks/train_throughput.py [--steps 5] [--warmup 2] [--threads N]
        [--heap as-shipped|default|reuse]
    python benchmarks/train_throughput.py --device cuda [--batch-size 16] [--compile]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

LR, WEIGHT_DECAY, GRAD_CLIP = 3e-4, 0.1, 1.0
H100_BF16_DENSE_TFLOPS = 989.0  # H100/H200 SXM datasheet, dense (no sparsity)
TARGET_VS_HF = 1.5
SHAPES = {  # device type -> model shape
    "cpu": dict(vocab_size=50257, context_length=256, d_model=384, n_layers=6, n_heads=6),
    "cuda": dict(vocab_size=50257, context_length=1024, d_model=768, n_layers=12, n_heads=12),
}


def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on fp32 logits, as our trainer's `lm_loss` computes it."""
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def build_ours(shape: dict, device, fused: bool):
    from llmscratch import GPT, ModelConfig
    from llmscratch.train.trainer import TrainConfig, build_optimizer, lm_loss

    model = GPT(ModelConfig(name="bench", dropout=0.0, **shape)).to(device)
    opt = build_optimizer(model, TrainConfig(lr=LR, weight_decay=WEIGHT_DECAY), device)
    return model, opt, lambda m, x, y: lm_loss(m, (x, y))[0]


def build_hf(shape: dict, device, fused: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=shape["vocab_size"], n_positions=shape["context_length"],
                     n_embd=shape["d_model"], n_layer=shape["n_layers"], n_head=shape["n_heads"],
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    model = GPT2LMHeadModel(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=fused)
    return model, opt, lambda m, x, y: loss_of(m(input_ids=x, use_cache=False).logits, y)


def build_book(shape: dict, device, fused: bool):
    from llms_from_scratch.ch04 import GPTModel

    cfg = {"vocab_size": shape["vocab_size"], "context_length": shape["context_length"],
           "emb_dim": shape["d_model"], "n_heads": shape["n_heads"], "n_layers": shape["n_layers"],
           "drop_rate": 0.0, "qkv_bias": True}
    model = GPTModel(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=fused)
    return model, opt, lambda m, x, y: loss_of(m(x), y)


BUILDERS = {"ours": build_ours, "transformers": build_hf, "book": build_book}
LABELS = {"ours": "ours (llmscratch GPT)", "transformers": "transformers GPT2LMHeadModel",
          "book": "book GPTModel (llms_from_scratch.ch04)"}


@dataclass
class Contender:
    kind: str  # ours | transformers | book
    precision: str  # fp32 | bf16
    compiled: bool = False
    step_times: list[float] = field(default_factory=list)
    phases: list[tuple[float, float, float]] = field(default_factory=list)  # fwd, bwd, optimizer (CPU only)
    losses: list[float] = field(default_factory=list)
    state: tuple | None = None  # model, optimizer, loss_fn, forward model
    peak_gib: float = 0.0  # CUDA only

    @property
    def label(self) -> str:
        return LABELS[self.kind] + (" + torch.compile" if self.compiled else "")

    @property
    def precision_label(self) -> str:
        return "bf16 autocast" if self.precision == "bf16" else "fp32"


def setup(c: Contender, shape: dict, device, fused: bool) -> None:
    torch.manual_seed(0)
    model, opt, loss_fn = BUILDERS[c.kind](shape, device, fused)
    model.train()
    c.state = (model, opt, loss_fn, torch.compile(model) if c.compiled else model)


def train_step(c: Contender, x, y, device, phases: bool) -> torch.Tensor:
    model, opt, loss_fn, fwd_model = c.state
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.precision == "bf16"):
        loss = loss_fn(fwd_model, x, y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if phases:
        c.phases.append((t1 - t0, t2 - t1, time.perf_counter() - t2))
    return loss.detach()


def run_alone(c: Contender, shape: dict, device: torch.device, fused: bool, x, y, warmup: int, steps: int) -> None:
    """One contender alone in memory: build, warm up, time, free."""
    on_cuda = device.type == "cuda"
    setup(c, shape, device, fused)
    for _ in range(warmup):
        train_step(c, x, y, device, phases=False)
    if on_cuda:  # the timed steps as one block, no host sync inside it
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(steps):
            loss = train_step(c, x, y, device, phases=False)
        torch.cuda.synchronize(device)
        c.step_times = [(time.perf_counter() - start) / steps] * steps
        c.losses.append(float(loss))
        c.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        for _ in range(steps):
            start = time.perf_counter()
            loss = train_step(c, x, y, device, phases=True)
            c.step_times.append(time.perf_counter() - start)
            c.losses.append(float(loss))
    c.state = None
    gc.collect()


def run_interleaved(contenders: list[Contender], shape: dict, device: torch.device, fused: bool, x, y,
                    warmup: int, steps: int) -> None:
    """Every contender alive at once; they take turns one step at a time (CPU only)."""
    for c in contenders:
        setup(c, shape, device, fused)
        for _ in range(warmup):
            train_step(c, x, y, device, phases=False)
    for _ in range(steps):
        for c in contenders:
            start = time.perf_counter()
            loss = train_step(c, x, y, device, phases=True)
            c.step_times.append(time.perf_counter() - start)
            c.losses.append(float(loss))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 on CPU, 16 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 5 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 2 CPU, 5 CUDA)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")
    parser.add_argument("--plain-adamw", action="store_true",
                        help="baselines use torch.optim.AdamW's default (unfused) implementation")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="accelerator peak for MFU (CUDA only; default: H100/H200 dense bf16)")
    parser.add_argument("--skip", default="", help="comma-separated contenders to leave out: ours,transformers,book")
    parser.add_argument("--schedule", choices=("sequential", "interleaved"), default="sequential",
                        help="sequential: each contender alone, one after another (default); interleaved (CPU "
                             "only): all alive, taking turns step by step, fairer under load from other processes")
    parser.add_argument("--heap", choices=("as-shipped", "default", "reuse"), default="as-shipped",
                        help="CPU memory allocator setting (see above): as-shipped (peers under glibc's defaults, "
                             "then ours with our trainer's setting; default), default (everyone under glibc's "
                             "defaults) or reuse (everyone with our setting)")
    parser.add_argument("--ours-default", choices=("fp32", "bf16"), default=None,
                        help="our trainer's default precision (default: what llmscratch.runtime picks for "
                             "--precision auto on this device)")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda given but CUDA is not available on this machine")
    if args.schedule == "interleaved" and device.type == "cuda":
        parser.error("--schedule interleaved is for the CPU")
    if args.schedule == "interleaved" and args.heap == "as-shipped" and device.type == "cpu":
        parser.error("--schedule interleaved runs every contender at once: pick --heap default or reuse")
    if device.type not in SHAPES:
        sys.exit(f"error: --device {args.device}: only cpu and cuda are supported")
    on_cuda = device.type == "cuda"
    batch = args.batch_size or (16 if on_cuda else 8)
    steps = args.steps or (20 if on_cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 2)
    ours_default = args.ours_default or C.ours_default_precision(device, "train")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(BUILDERS):
        parser.error(f"--skip takes names from {','.join(BUILDERS)}")
    if "transformers" not in skip:
        transformers = C.require("transformers", "pip install 'llmscratch[bench]' (or: pip install transformers),"
                                 " or pass --skip transformers")
    if "book" not in skip:
        C.require("llms_from_scratch", "pip install llms-from-scratch (the book's package), or pass --skip book")

    threads = C.set_threads(args.threads)
    if on_cuda:
        if device.index is not None:
            torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    shape = SHAPES[device.type]
    T = shape["context_length"]
    fused = not args.plain_adamw

    from llmscratch import ModelConfig
    from llmscratch.model import flops_per_token
    from llmscratch.runtime import cpu_memory_kept_for_reuse

    flops_tok = flops_per_token(ModelConfig(name="bench", **shape), T, training=True)
    versions = []
    if "transformers" not in skip:
        versions.append(f"transformers {transformers.__version__}")
    heap = "n/a (CUDA)" if on_cuda else {
        "as-shipped": "peers under glibc's defaults, ours with the trainer's cpu_memory_kept_for_reuse",
        "default": "glibc's defaults for everyone", "reuse": "cpu_memory_kept_for_reuse for everyone"}[args.heap]
    versions.append(f"CPU heap: {heap}")
    print(C.header("training throughput benchmark", device, ", ".join(versions)))
    print(f"model: {shape['n_layers']} layers, {shape['d_model']} dims, {shape['n_heads']} heads, context {T}, "
          f"vocab {shape['vocab_size']}, dropout 0 | batch {batch} ({batch * T} tokens/step) | "
          f"AdamW lr {LR} wd {WEIGHT_DECAY} ({'fused' if fused else 'baselines unfused, ours fused'}), "
          f"clip {GRAD_CLIP} | {warmup} warm-up + {steps} timed steps | "
          f"{flops_tok / 1e9:.3f} GFLOP/token (6N + attention)")

    precisions = ["bf16"] if on_cuda else ["fp32", "bf16"]
    contenders = []
    for compiled in ([False, True] if args.compile else [False]):
        for kind in BUILDERS:
            if kind in skip:
                continue
            for p in precisions:
                if p == "bf16" and kind == "book" and not on_cuda:
                    continue  # the book's model is compared at fp32 only on the CPU
                contenders.append(Contender(kind, p, compiled))

    if not on_cuda and args.heap == "as-shipped":
        # The peers first: leaving the setting restores glibc's limits but not its adaptive mmap threshold
        # (any mallopt call freezes it), so a peer run after ours would not see glibc's true defaults.
        contenders.sort(key=lambda c: c.kind == "ours")  # (a stable sort)
    torch.manual_seed(1234)
    data = torch.randint(0, shape["vocab_size"], (batch, T + 1), device=device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    everyone_reuses = not on_cuda and args.heap == "reuse"
    with cpu_memory_kept_for_reuse() if everyone_reuses else contextlib.nullcontext():
        if args.schedule == "sequential":
            for c in contenders:
                # As our trainer does on a CPU: the setting for ours' whole run, left once its tensors are freed.
                shipped = c.kind == "ours" and not on_cuda and args.heap == "as-shipped"
                with cpu_memory_kept_for_reuse() if shipped else contextlib.nullcontext():
                    run_alone(c, shape, device, fused, x, y, warmup, steps)
                if on_cuda:
                    torch.cuda.empty_cache()
                print(f"  done: {c.label}, {c.precision_label}: {batch * T / C.median(c.step_times):,.0f} tok/s",
                      flush=True)
        else:
            run_interleaved(contenders, shape, device, fused, x, y, warmup, steps)

    tok = {}
    rows = []
    for c in contenders:
        rate = batch * T / C.median(c.step_times)  # CUDA: the block's mean; CPU: the median step
        tok[(c.kind, c.precision, c.compiled)] = rate
        row = [c.label, c.precision_label, f"{rate:,.0f}", f"{rate * flops_tok / 1e9:,.0f}"]
        if on_cuda:
            row += [f"{rate * flops_tok / (args.peak_tflops * 1e12):.1%}", f"{c.peak_gib:.1f}"]
        else:
            fwd, bwd, opt = (C.median([p[i] for p in c.phases]) for i in range(3))
            lo, hi = batch * T / max(c.step_times), batch * T / min(c.step_times)
            row += [f"{lo:,.0f}–{hi:,.0f}", f"{fwd:.2f}", f"{bwd:.2f}", f"{opt:.2f}"]
        row.append(f"{c.losses[-1]:.3f}")
        rows.append(row)
    headers = ["model", "precision", "tokens/s", "GFLOP/s"]
    headers += ["MFU", "peak GiB"] if on_cuda else ["steps' range tok/s", "fwd s", "bwd s", "clip+optim s"]
    headers.append("last loss")
    print()
    print(C.markdown_table(headers, rows, "ll" + "r" * (len(headers) - 2)))
    if on_cuda:
        print(f"MFU against {args.peak_tflops:g} TFLOP/s dense bf16 peak "
              f"({'H100/H200 SXM datasheet' if args.peak_tflops == H100_BF16_DENSE_TFLOPS else '--peak-tflops'}); "
              f"this device: {torch.cuda.get_device_name(device)}")

    print()
    for compiled in ([False, True] if args.compile else [False]):
        suffix = " (torch.compile)" if compiled else ""
        ours_def, hf_def = tok.get(("ours", ours_default, compiled)), tok.get(("transformers", "fp32", compiled))
        if not on_cuda and ours_def and hf_def:
            r = ours_def / hf_def
            print(f"ours at its default ({ours_default}) ÷ transformers at its default (fp32){suffix}: {r:.2f} "
                  f"({C.verdict(r, TARGET_VS_HF)})")
            other = "fp32" if ours_default == "bf16" else "bf16"
            if ("ours", other, compiled) in tok:
                r = tok[("ours", other, compiled)] / hf_def
                print(f"ours {other} ÷ transformers fp32{suffix}, were {other} our CPU default: {r:.2f} "
                      f"({C.verdict(r, TARGET_VS_HF)})")
        for p in precisions:
            o, h, b = (tok.get((k, p, compiled)) for k in ("ours", "transformers", "book"))
            parts = [f"ours ÷ transformers {o / h:.2f}" if o and h else "",
                     f"ours ÷ book {o / b:.2f}" if o and b else ""]
            if any(parts):
                print(f"same precision ({p}){suffix}: " + "; ".join(p_ for p_ in parts if p_))
    if not on_cuda:
        note = C.contention_note(threads)
        print(f"load avg (1/5/15 min) at end: {C.load_average()}" + (f"\n{note}" if note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
