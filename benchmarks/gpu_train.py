"""GPU training benchmark (issue 7): our GPT vs Hugging Face `GPT2LMHeadModel`, eager and compiled, same run.

    python benchmarks/gpu_train.py                 # one H100/H200, ≈4 minutes
    python benchmarks/gpu_train.py --tiny --device cpu --steps 2 --warmup 1   # dry run of the logic on a CPU

GPT-2 124M at context 1024, bf16 autocast, batch --batch-size (32), one fixed random batch, dropout 0, TF32
allowed. Everyone gets the same optimizer (fused AdamW, lr 3e-4, wd 0.1) and gradient clipping at 1.0; one step
is forward + backward + clip + optimizer step + zero_grad, and the timed steps run as one block between two
`torch.cuda.synchronize()` calls. Tokens/s = batch × context × steps / block time; MFU = tokens/s × training
FLOPs per token (`llmscratch.model.flops_per_token`: 6N + attention, the PaLM accounting) / --peak-tflops
(default 989, the dense bf16 datasheet peak of the H100/H200 SXM).

Sections: (1) correctness on one batch in bf16 — our fused chunked loss vs the plain logits + cross-entropy,
compiled vs eager, and the bf16 residual stream vs the fp32 one — and our Triton kernels (`model/kernels.py`)
alone against inductor's kernels for the expressions they replace, results and time; (2) the throughput
table: transformers eager/compiled, ours eager and compiled three ways (the whole model, each block
separately — "regional" compilation, which compiles one block's code once for all layers — and the whole
model with the loss in a single chunk), by default with the bf16 residual stream that the trainer uses on
CUDA, each optionally with other modifiers (`--variants one-chunk+bf16res+autotune`); (3) the top CUDA
kernels of chosen variants (`--profile`, torch.profiler) and their CUDA time per kernel group; (4) scaling:
ours with regional compilation and the bf16 residual stream (and fp8 where a point asks) at 124M/355M/774M and
at context 1024→4096 (`--scaling`).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from train_throughput import GRAD_CLIP, H100_BF16_DENSE_TFLOPS, build_hf, build_ours  # noqa: E402

TARGET_MFU, TARGET_VS_HF = 0.55, 1.9
GPT2 = dict(vocab_size=50257, context_length=1024, d_model=768, n_layers=12, n_heads=12)
SIZES = {"124m": dict(d_model=768, n_layers=12, n_heads=12), "355m": dict(d_model=1024, n_layers=24, n_heads=16),
         "774m": dict(d_model=1280, n_layers=36, n_heads=20)}
VARIANTS = ("eager", "compiled", "regional", "one-chunk")
# Modifiers that are inductor settings (torch.compile's `options`). tilefuse, mixorder and combo target the
# kernels that the 18:30 UTC profile shows reading the same data twice: the GELU backward written by one kernel
# and re-read for the fc bias gradient's column sums by another (1.0 ms a step at micro-batch 32), likewise the
# q/k/v gradient and its bias (0.7 ms); an option this PyTorch lacks makes that variant fail, and it is reported.
INDUCTOR_MODIFIERS = {
    "autotune": {"max_autotune": True, "coordinate_descent_tuning": True},  # = mode max-autotune-no-cudagraphs
    "coord": {"coordinate_descent_tuning": True},
    "cudagraphs": {"triton.cudagraphs": True},  # = mode reduce-overhead
    "tilefuse": {"triton.tiling_prevents_reduction_fusion": False, "triton.tiling_prevents_pointwise_fusion": False},
    "mixorder": {"triton.mix_order_reduction": True},
    "combo": {"combo_kernels": True},
    "aggressive": {"aggressive_fusion": True},
}
MODIFIERS = ("bf16res", "flash", "torchloss", "torchgelu", "qkvkernel", "fp8", *INDUCTOR_MODIFIERS)
SCALING_VARIANT = "regional+bf16res"  # compile time flat in depth; bf16 residual as the trainer has on CUDA
TINY = dict(vocab_size=1000, context_length=64, d_model=64, n_layers=2, n_heads=4)


def parse_variant(name: str) -> tuple[str, set[str]]:
    """"one-chunk+bf16res+autotune" -> ("one-chunk", {"bf16res", "autotune"})."""
    base, *mods = name.split("+")
    if base not in VARIANTS or set(mods) - set(MODIFIERS):
        raise ValueError(name)
    return base, set(mods)


def ours_variant(name: str, shape: dict, device):
    """(model, optimizer, step_loss(x, y)) for one of our variants: a base — eager | compiled | regional |
    one-chunk — with optional modifiers joined by "+": bf16res (the residual stream between blocks kept in bf16,
    `ModelOptions.low_precision_residual`), autotune (inductor's `max-autotune-no-cudagraphs`: it benchmarks Triton
    templates against cuBLAS per matmul, minutes of compilation), coord (inductor's coordinate-descent tuning:
    each generated Triton kernel — the elementwise, norm and loss kernels — has its block sizes and warps tuned
    by benchmarking neighbouring configurations; cuBLAS products untouched), flash (SDPA limited to the
    FlashAttention-2 backend; PyTorch picks cuDNN's attention on Hopper by default), cudagraphs (inductor
    replays the compiled forward and backward as CUDA graphs: no per-kernel launch gaps), torchloss (the loss's
    PyTorch expressions instead of its Triton kernel, `ModelOptions.loss_kernel`), torchgelu (GPT-2's fc bias + GELU
    as PyTorch expressions instead of our Triton kernels, whose backward also sums the bias gradient; they run in
    compiled steps by default, `ModelOptions.gelu_kernel`), qkvkernel (the q/k/v split whose backward assembles
    the gradients and the bias gradient in one kernel, `ModelOptions.qkv_kernel`), fp8 (the blocks' linears as
    torchao's Float8Linear, what `--train.precision fp8` trains with: `llmscratch.train.fp8`; the GELU and q/k/v
    kernels then step aside, as they do for any linear that is not a plain `nn.Linear`), and the fusion settings
    tilefuse, mixorder, combo, aggressive (`INDUCTOR_MODIFIERS`)."""
    from llmscratch.model.loss import lm_head_cross_entropy

    kind, mods = parse_variant(name)
    model, opt, _ = build_ours(shape, device, fused=True)
    model_options = model.set_options(loss_kernel="torchloss" not in mods, qkv_kernel="qkvkernel" in mods,
                                      gelu_kernel="never" if "torchgelu" in mods else "compiled",
                                      low_precision_residual="bf16res" in mods)
    if "fp8" in mods:
        from llmscratch.train import fp8

        fp8.convert(model, device)
    options = {}  # inductor settings for torch.compile (it takes either a mode or these options)
    for mod in sorted(mods & INDUCTOR_MODIFIERS.keys()):
        options.update(INDUCTOR_MODIFIERS[mod])
    options = options or None
    if kind == "eager":
        fn = lambda x, y: model(x, targets=y)  # noqa: E731
    elif kind == "regional":
        for block in model.blocks:
            block.compile(options=options)
        fn = lambda x, y: model(x, targets=y)  # noqa: E731
    elif kind == "one-chunk":
        def one_chunk(x, y):
            h = model.features(x).flatten(0, 1)
            return lm_head_cross_entropy(h, model.lm_head.weight, y.flatten(), chunk_size=h.size(0),
                                         use_kernel=model_options.loss_kernel)
        fn = torch.compile(one_chunk, options=options)
    else:
        compiled = torch.compile(model, options=options)
        fn = lambda x, y: compiled(x, targets=y)  # noqa: E731
    if "flash" not in mods:
        return model, opt, fn

    def with_flash_attention(x, y):  # the backend is chosen when the graph is traced, backward included
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return fn(x, y)
    return model, opt, with_flash_attention


def hf_variant(kind: str, shape: dict, device):
    model, opt, loss_fn = build_hf(shape, device, fused=True)
    fwd = torch.compile(model) if kind == "compiled" else model
    return model, opt, lambda x, y: loss_fn(fwd, x, y)


def measure(build, shape: dict, batch: int, steps: int, warmup: int, device, profile: bool = False) -> dict:
    """Build, warm up (compilation happens here), then time `steps` optimizer steps as one block."""
    torch._dynamo.reset()  # each contender compiles afresh: no stale guards, no recompile limit reached
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, opt, loss_fn = build()
    model.train()
    T = shape["context_length"]
    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, shape["vocab_size"], (batch, T + 1), generator=g).to(device)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        step()
    C.synchronize(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    C.synchronize(device)
    secs = (time.perf_counter() - start) / steps
    out = {"tok_s": batch * T / secs, "step_ms": secs * 1e3, "loss": float(loss), "warm_s": warm_s,
           "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")}
    if profile:
        out["profile"] = top_kernels(step, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


KERNEL_GROUPS = (  # (group, substrings of a CUDA kernel's name), first match wins
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "triton_tem")),
    ("optimizer + clip", ("adam", "multi_tensor", "foreach", "norm_kernel", "tensor_apply")),
    ("loss (our Triton kernel)", ("cross_entropy_rows",)),
    ("fused elementwise/norm (Triton)", ("triton",)),
    ("embedding", ("embedding", "index", "scatter", "gather")),
)


def kernel_us(ev) -> float:
    """A profiler record's own GPU time in µs when it is a GPU kernel (or copy, memset), else 0. CPU-side ops and
    record_function ranges (e.g. "Optimizer.step#AdamW.step") carry their kernels' time too: no double count."""
    if getattr(ev, "device_type", None) is not None and "CUDA" not in str(ev.device_type):
        return 0.0
    if "#" in ev.key or ev.key.startswith(("Optimizer.", "ProfilerStep", "## ")):
        return 0.0
    return getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0.0)


def kernel_breakdown(prof, steps: int) -> str:
    """Our step's CUDA time per kernel group, in ms per step, from the profiler's per-kernel totals."""
    totals: dict[str, float] = {}
    for ev in prof.key_averages():
        us = kernel_us(ev)
        if not us:
            continue
        name = ev.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in name for k in keys)), "other")
        totals[group] = totals.get(group, 0.0) + us
    whole = sum(totals.values()) or 1.0
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    lines = [f"  {g:34s} {us / 1e3 / steps:7.2f} ms/step  {us / whole:6.1%}" for g, us in rows]
    return "\n".join(lines + [f"  {'all kernels':34s} {whole / 1e3 / steps:7.2f} ms/step"])


def eager_reductions(prof, steps: int) -> str:
    """The `aten::sum` calls a step makes, by input shape and by Python call site. The H200 profile of 2026-11-26
    found 50 a step of shape (2048, 768) with no Python call site (~0.5 ms at micro-batch 32): by count and shape,
    most likely the second stage of inductor's reductions for the 25 LayerNorms' weight and bias gradients
    (32,768 rows in partial sums of 16), called from its generated wrapper."""
    lines = [f"  {e.count // steps} a step, input shapes {e.input_shapes}"
             for e in prof.key_averages(group_by_input_shape=True) if e.key == "aten::sum"]
    for e in [e for e in prof.key_averages(group_by_stack_n=8) if e.key == "aten::sum"][:4]:
        lines.append(f"  {e.count // steps} a step from: " + " <- ".join(e.stack[:8]))
    return "\n\naten::sum calls (ATen reductions the step launches):\n" + ("\n".join(lines) if lines else "  none")


def top_kernels(step, device, n: int = 40) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 3
    try:
        with profile(activities=acts, record_shapes=True, with_stack=True) as prof:
            for _ in range(steps):
                step()
            C.synchronize(device)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=key, row_limit=n, max_name_column_width=70)
        return table + ("\nCUDA time by kernel group:\n" + kernel_breakdown(prof, steps)
                        if device.type == "cuda" else "") + eager_reductions(prof, steps)
    except Exception as exc:  # the profiler may be unavailable in a sandboxed runtime
        return f"(profiler unavailable: {exc})"


def _time_and_outputs(contenders: dict, device, calls: int = 20) -> tuple[dict, dict]:
    """Each contender's outputs (as fp32) and its time per call in ms: the GPU time of the kernels it launches,
    summed from the profiler's kernel records over `calls` calls. Wall-clock timing (CUDA events around the calls)
    also counts the host's launch cost whenever the host is the slower side: on the H200 (2026-11-26) it gave our
    eager GELU kernels 1.05 ms forward + backward, where the profile of the compiled training step shows the same
    kernels taking 0.32 ms (the host's share is inferred, not measured)."""
    from torch.profiler import ProfilerActivity, profile

    outs, times = {}, {}
    for name, fn in contenders.items():
        outs[name] = [t.detach().float() for t in fn()]
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize(device)
        times[name] = sum(kernel_us(e) for e in prof.key_averages()) / 1e3 / calls
    return outs, times


def kernel_checks(device, rows: int = 16384, vocab: int = 50257, padded: int = 50304) -> None:
    """Our Triton kernels (`model/kernels.py`) alone, against inductor's compiled kernels for the PyTorch
    expressions they replace: same results, and time per call. (1) The loss step on one chunk of bf16 logits
    (rows × padded vocabulary: GPT-2 at the trainer's CUDA chunk). (2) bias + GELU, forward and backward with the
    bias gradient, on GPT-2's fc output at micro-batch 32 (32,768 × 3,072 bf16). (3) The q/k/v gradients of one
    GPT-2 layer at micro-batch 32 assembled into the projection's gradient, with the bias sums."""
    from llmscratch.model.dispatch import triton_kernels

    kernels = triton_kernels(torch.empty(1, device=device))
    if kernels is None:
        print("- Triton kernels: not available here (they need an NVIDIA GPU and Triton)")
        return
    _loss_kernel_check(kernels, device, rows, vocab, padded)
    _gelu_kernel_check(kernels, device)
    _qkv_kernel_check(kernels, device)
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def _loss_kernel_check(kernels, device, rows: int, vocab: int, padded: int) -> None:
    from llmscratch.model import loss as L

    g = torch.Generator(device=device).manual_seed(0)
    z = (torch.randn(rows, padded, device=device, generator=g) * 4).to(torch.bfloat16)
    y = torch.randint(0, vocab, (rows,), device=device, generator=g)
    torch._dynamo.reset()  # (use_kernel=False: the compiled expression must not dispatch to the kernel itself)
    inductor = torch.compile(lambda z, y: L._losses_and_logit_grads(z, y, vocab, True, True, use_kernel=False))
    outs, times = _time_and_outputs({"Triton kernel": lambda: kernels.cross_entropy_rows(z, y, vocab),
                                     "PyTorch expression, compiled": lambda: inductor(z, y)}, device)
    (l1, g1), (l2, g2) = outs.values()
    dl, dg = float((l1 - l2).abs().max()), float((g1 - g2).abs().max())
    ok = dl < 1e-3 and dg < 1e-2 and bool(g1[:, vocab:].eq(0).all())
    gb = rows * padded * 2 * 2 / 1e9  # one read of the logits, one write of the gradient
    print(f"- {'PASS' if ok else 'FAIL'} Triton loss kernel ≈ compiled PyTorch expression ({rows}×{padded} bf16): "
          f"losses max diff {dl:.1e}, gradient max diff {dg:.1e}, padding columns' gradient 0", flush=True)
    for name, ms in times.items():
        print(f"  {name}: {ms:.3f} ms per call ({gb / ms:.2f} TB/s counting one read + one write)", flush=True)
    print(f"  the autotuner's choice: {getattr(kernels._tuned_kernel, 'best_config', '?')}", flush=True)


def _gelu_kernel_check(kernels, device, n: int = 32768, d_ff: int = 3072) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(n, d_ff, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    b = (torch.randn(d_ff, device=device, generator=g) * 0.1).requires_grad_()
    go = torch.randn(n, d_ff, device=device, generator=g).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled_gelu = torch.compile(lambda h, b: F.gelu(h + b.to(h.dtype), approximate="tanh"))  # as autocast adds it

    def forward_backward(fn):
        out = fn(h, b)
        return (out, *torch.autograd.grad(out, (h, b), go))
    outs, times = _time_and_outputs({"Triton kernels": lambda: forward_backward(kernels.gelu_bias),
                                     "PyTorch expression, compiled": lambda: forward_backward(compiled_gelu)},
                                    device)
    (o1, gh1, gb1), (o2, gh2, gb2) = outs.values()
    rel = [float((a - c).abs().max() / c.abs().max()) for a, c in ((o1, o2), (gh1, gh2), (gb1, gb2))]
    ok = max(rel) < 2e-2
    print(f"- {'PASS' if ok else 'FAIL'} Triton bias + GELU ≈ compiled PyTorch expression ({n}×{d_ff} bf16, "
          f"forward and backward): max diff relative to the largest value: output {rel[0]:.1e}, input gradient "
          f"{rel[1]:.1e}, bias gradient {rel[2]:.1e}", flush=True)
    for name, ms in times.items():
        print(f"  {name}: {ms:.3f} ms forward + backward (GPU time)", flush=True)


def _qkv_kernel_check(kernels, device, batch: int = 32, heads: int = 12, seq: int = 1024, head_dim: int = 64) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    grads = [torch.randn(batch, heads, seq, head_dim, device=device, generator=g).to(torch.bfloat16)
             for _ in range(3)]
    torch._dynamo.reset()

    def assemble(dq, dk, dv):  # what autograd + inductor do for the split q/k/v views and the bias
        rows = torch.cat([t.transpose(1, 2).reshape(batch * seq, heads * head_dim) for t in (dq, dk, dv)], dim=1)
        return rows, rows.float().sum(0)
    compiled = torch.compile(assemble)
    outs, times = _time_and_outputs({"Triton kernel": lambda: kernels.heads_to_rows(*grads),
                                     "PyTorch expression, compiled": lambda: compiled(*grads)}, device)
    (r1, b1), (r2, b2) = outs.values()
    d_rows, d_bias = float((r1 - r2).abs().max()), float((b1 - b2).abs().max() / b2.abs().max())
    ok = d_rows == 0 and d_bias < 1e-4
    print(f"- {'PASS' if ok else 'FAIL'} Triton q/k/v gradient assembly + bias sums ≈ compiled PyTorch expression "
          f"(3 × {batch}×{heads}×{seq}×{head_dim} bf16): rows max diff {d_rows:.1e}, bias sums relative diff "
          f"{d_bias:.1e}", flush=True)
    for name, ms in times.items():
        print(f"  {name}: {ms:.3f} ms per call", flush=True)


def correctness(shape: dict, batch: int, device) -> list[tuple[str, bool, str]]:
    """Same init, same batch, bf16 autocast: fused loss vs plain logits+CE; compiled vs eager; bf16 vs fp32
    residual stream; losses and the first layer's qkv gradient close."""
    from llmscratch import GPT, ModelConfig

    torch.manual_seed(0)
    T = shape["context_length"]
    ref = GPT(ModelConfig(name="check", **shape)).to(device)
    x = torch.randint(0, shape["vocab_size"], (batch, T), device=device)
    y = torch.randint(0, shape["vocab_size"], (batch, T), device=device)
    rows = []

    def loss_and_grad(fn):
        ref.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = fn()
        loss.backward()
        return float(loss.detach()), ref.blocks[0].attn.qkv.weight.grad.float().clone()

    fused, g_fused = loss_and_grad(lambda: ref(x, targets=y))
    plain, g_plain = loss_and_grad(lambda: F.cross_entropy(ref(x).flatten(0, 1).float(), y.flatten()))
    ref.set_options(low_precision_residual=True)
    lowres, g_lowres = loss_and_grad(lambda: ref(x, targets=y))
    ref.set_options(low_precision_residual=False)
    torch._dynamo.reset()
    compiled_model = torch.compile(ref)
    comp, g_comp = loss_and_grad(lambda: compiled_model(x, targets=y))

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    rows.append(("fused chunked loss ≈ logits + cross_entropy (bf16)", abs(fused - plain) < 2e-2 and
                 rel(g_fused, g_plain) < 2e-2,
                 f"{fused:.5f} vs {plain:.5f}; grad rel diff {rel(g_fused, g_plain):.1e}"))
    rows.append(("compiled ≈ eager (bf16)", abs(comp - fused) < 2e-2 and rel(g_comp, g_fused) < 2e-2,
                 f"{comp:.5f} vs {fused:.5f}; grad rel diff {rel(g_comp, g_fused):.1e}"))
    rows.append(("bf16 residual stream ≈ fp32 residual stream (bf16 autocast)",
                 abs(lowres - fused) < 2e-2 and rel(g_lowres, g_fused) < 2e-2,
                 f"{lowres:.5f} vs {fused:.5f}; grad rel diff {rel(g_lowres, g_fused):.1e}"))
    with torch.no_grad():
        logits = ref(x[:1, :8])
    rows.append(("logits cover the real vocabulary only (padding never sampled)",
                 logits.size(-1) == shape["vocab_size"], f"logits last dim {logits.size(-1)}"))
    gc.collect()
    return rows


DEFAULT_SCALING = "355m:1024:32,774m:1024:16,124m:4096:8"


def parse_scaling(text: str) -> list[tuple[str, int, int, list[str]]]:
    """"355m:1024:32,774m:1024:16+fp8" -> [("355m", 1024, 32, []), ("774m", 1024, 16, ["fp8"])]: size, context,
    micro-batch and the modifiers added to the scaling variant. Raises ValueError naming a bad entry."""
    grid = []
    for entry in filter(None, text.split(",")):
        point, *mods = entry.split("+")
        parts = point.split(":")
        if (len(parts) != 3 or parts[0] not in SIZES or not parts[1].isdigit() or not parts[2].isdigit()
                or set(mods) - set(MODIFIERS)):
            raise ValueError(entry)
        grid.append((parts[0], int(parts[1]), int(parts[2]), mods))
    return grid


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: every variant named exists, and every profiled one is timed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per contender")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: a dry run of the script's logic")
    ap.add_argument("--skip-scaling", action="store_true", help="leave out the scaling table")
    ap.add_argument("--scaling", default=DEFAULT_SCALING,
                    help=f"the scaling table's points, comma-separated SIZE:CONTEXT:MICROBATCH, each optionally with "
                         f"'+modifier's added to {SCALING_VARIANT} (sizes: {', '.join(SIZES)}; e.g. 774m:1024:16+fp8)")
    ap.add_argument("--variants", default="eager,compiled+bf16res,regional+bf16res,one-chunk+bf16res",
                    help="our variants to time (comma-separated): a base (eager, compiled, regional, one-chunk) "
                         "with optional modifiers joined by '+': bf16res (bf16 residual stream), autotune "
                         "(max-autotune; minutes of compilation), coord (coordinate-descent tuning of the Triton "
                         "kernels), flash (FlashAttention-2 instead of cuDNN attention), torchloss (the loss as "
                         "PyTorch expressions, not our Triton kernel), torchgelu (bias + GELU as PyTorch "
                         "expressions, not our Triton kernels), qkvkernel (the q/k/v gradients and bias sums in "
                         "one kernel), cudagraphs, and inductor fusion settings tilefuse, mixorder, combo, "
                         "aggressive; e.g. one-chunk+bf16res")
    ap.add_argument("--hf-variants", default="eager,compiled",
                    help="transformers contenders (comma-separated): eager, compiled (eager at micro-batch 64 "
                         "needs ~88 GiB: leave it out on an H100)")
    ap.add_argument("--profile", default=None,
                    help="our variants whose kernels are profiled, 3 steps each (comma-separated; each must be "
                         "among --variants; default: compiled+bf16res when it is)")
    args = ap.parse_args(argv)
    try:
        parse_scaling(args.scaling)
    except ValueError as e:
        ap.error(f"--scaling: bad point {e}; use SIZE:CONTEXT:MICROBATCH[+modifier...], sizes {', '.join(SIZES)}")
    if set(filter(None, args.hf_variants.split(","))) - {"eager", "compiled"}:
        ap.error(f"--hf-variants: choose from eager, compiled (got {args.hf_variants!r})")
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        try:
            parse_variant(v)
        except ValueError:
            ap.error(f"--variants: unknown {v!r}; bases: {', '.join(VARIANTS)}; modifiers: {', '.join(MODIFIERS)}")
    if args.profile is None:
        args.profile = "compiled+bf16res" if "compiled+bf16res" in variants else ""
    unprofiled = [v for v in args.profile.split(",") if v and v not in variants]
    if unprofiled:
        ap.error(f"--profile: {', '.join(unprofiled)} not among --variants, so never timed or profiled")
    return args


def main() -> int:
    args = parse_args()
    hf_kinds = [k for k in args.hf_variants.split(",") if k]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (for a dry run: --tiny --device cpu)")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    transformers = C.require("transformers", "pip install transformers")
    from llmscratch import ModelConfig
    from llmscratch.model import flops_per_token

    base = TINY if args.tiny else GPT2
    B = args.batch_size
    print(C.header("GPU training benchmark (issue 7)", device, f"transformers {transformers.__version__}"),
          flush=True)

    def flops(shape):
        return flops_per_token(ModelConfig(name="bench", **shape), shape["context_length"], training=True)

    def mfu(r, shape):
        return r["tok_s"] * flops(shape) / (args.peak_tflops * 1e12)

    print("\n## correctness (one batch, bf16 autocast)\n", flush=True)
    try:
        for name, ok, detail in correctness(base, min(B, 4), device):
            print(f"- {'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    except Exception:
        traceback.print_exc()
    if device.type == "cuda" and not args.tiny:
        try:
            kernel_checks(device)
        except Exception:
            traceback.print_exc()

    print(f"\n## throughput: GPT-2 124M shape, context {base['context_length']}, batch {B}, bf16 autocast, "
          f"{args.warmup} warm-up + {args.steps} timed steps\n", flush=True)
    profiled = set(args.profile.split(","))
    contenders = [("transformers", k) for k in hf_kinds]
    contenders += [("ours", v) for v in args.variants.split(",") if v]
    results = {}
    for who, kind in contenders:
        build = (lambda k=kind: ours_variant(k, base, device)) if who == "ours" else \
            (lambda k=kind: hf_variant(k, base, device))
        try:
            results[(who, kind)] = measure(build, base, B, args.steps, args.warmup, device,
                                           profile=who == "ours" and kind in profiled)
            r = results[(who, kind)]
            print(f"  {who} {kind}: {r['tok_s']:,.0f} tok/s, MFU {mfu(r, base):.1%}, {r['peak_gib']:.1f} GiB, "
                  f"warm-up {r['warm_s']:.0f}s", flush=True)
            if "profile" in r:  # printed now: a later contender (autotune) may run past the script's time cap
                print(f"\n## top kernels, ours {kind} (3 steps)\n\n{r['profile']}\n", flush=True)
        except Exception:
            print(f"  {who} {kind}: FAILED", flush=True)
            traceback.print_exc()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows = [[f"{who} {kind}", f"{r['tok_s']:,.0f}", f"{r['step_ms']:.1f}", f"{mfu(r, base):.1%}",
             f"{r['peak_gib']:.1f}", f"{r['warm_s']:.0f}", f"{r['loss']:.3f}"] for (who, kind), r in results.items()]
    print()
    print(C.markdown_table(["contender", "tokens/s", "ms/step", "MFU", "peak GiB", "warm-up s", "last loss"], rows))
    ours = {k: r for (who, k), r in results.items() if who == "ours"}
    best = max(ours, key=lambda k: ours[k]["tok_s"]) if ours else None
    hf_c, hf_e = results.get(("transformers", "compiled")), results.get(("transformers", "eager"))
    if best:
        r = ours[best]
        print(f"\nours fastest: {best}, MFU {mfu(r, base):.1%} ({C.verdict(mfu(r, base), TARGET_MFU)}) against "
              f"{args.peak_tflops:g} TFLOP/s")
        if hf_c:
            ratio = r["tok_s"] / hf_c["tok_s"]
            print(f"ours {best} ÷ transformers compiled: {ratio:.2f} ({C.verdict(ratio, TARGET_VS_HF)})")
        if hf_e and "eager" in ours:
            print(f"ours eager ÷ transformers eager: {ours['eager']['tok_s'] / hf_e['tok_s']:.2f}")

    if not args.skip_scaling:
        # Regional compilation here: one block's code is compiled once for every layer, so the deeper models
        # cost no more compile time than 124M (whole-model compilation grows with depth).
        print(f"\n## scaling, ours {SCALING_VARIANT} (+ the modifiers a row names)\n", flush=True)
        grid = parse_scaling(args.scaling)
        if args.tiny:
            grid = [("124m", 128, max(1, B // 2), mods) for _, _, _, mods in grid[:2]]
        rows = []
        if SCALING_VARIANT in ours:
            r = ours[SCALING_VARIANT]
            rows.append(["124m", base["context_length"], B, SCALING_VARIANT, f"{r['tok_s']:,.0f}",
                         f"{mfu(r, base):.1%}", f"{r['peak_gib']:.1f}", f"{r['warm_s']:.0f}", f"{r['loss']:.3f}"])
        for size, T, b, mods in grid:
            shape = dict(base, **({} if args.tiny else SIZES[size]), context_length=T)
            variant = SCALING_VARIANT + "".join(f"+{m}" for m in mods)
            try:
                r = measure(lambda s=shape, v=variant: ours_variant(v, s, device), shape, b,
                            max(3, args.steps // 2), args.warmup, device)
                rows.append([size, T, b, variant, f"{r['tok_s']:,.0f}", f"{mfu(r, shape):.1%}",
                             f"{r['peak_gib']:.1f}", f"{r['warm_s']:.0f}", f"{r['loss']:.3f}"])
                print(f"  {size} ctx {T} batch {b} {variant}: {r['tok_s']:,.0f} tok/s, MFU {mfu(r, shape):.1%}",
                      flush=True)
            except Exception:
                print(f"  {size} ctx {T} batch {b} {variant}: FAILED", flush=True)
                traceback.print_exc()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        print()
        print(C.markdown_table(["model", "context", "batch", "variant", "tokens/s", "MFU", "peak GiB", "warm-up s",
                                "last loss"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
