"""Decoding speed on the CPU: our GPT (with and without its KV cache) against Hugging Face `transformers`.

Batch 1 (--batch-size), a GPT-2-124M-shaped model with random weights, a 10-token prompt, greedy decoding
of --new-tokens tokens (100). Each contender runs at fp32 (everyone's default) and at bf16 (weights and
activations cast, the same for all). Tokens/s counts the new tokens of every sequence over the whole call,
prefill included.

The weight-streaming bound: one decode step has to read every weight matrix once, so a chain of
matrix-vector products with the same shapes (per layer qkv, attention out-projection, MLP fc and proj; then
the LM head) timed on this machine is the fastest a step can be; tokens/s bound = 1 / that time. With
--batch-size B the chain multiplies B rows at once (still one read of each weight) and tokens/s counts B per
step. Everything else a step does (layer norms, attention over the cache, sampling, Python) only adds. The
chain is timed two ways: with F.linear (what nn.Linear runs) and with the weights pre-packed for oneDNN (the
layout inductor's CPU freezing uses), which streams them about twice as fast here; the bound is the faster
of the two.

Ours runs four ways per dtype: as built (plain nn.Linear); with every linear weight packed for oneDNN by
llmscratch.model.packed; packed only where packing pays on this CPU (`packing_pays`: each shape measured once
per CPU model and remembered), which is what `llmscratch generate` does on a CPU until its compiled-ahead step
is built; "ours at its default", `llmscratch generate` (with --dtype auto: bf16 on CPUs with AVX512-BF16/AMX)
once that step is in the cache folder (llmscratch.model.aot: compiled once per machine and shape, loaded in
milliseconds; built here before timing, and the time that takes printed); and compiled, as
`llmscratch generate --compile` runs
(llmscratch.generate.CompiledDecodeStep around the packed linears: one block compiled, its graph run for every
layer, the weights its inputs). Its first call compiles; the time that takes is printed apart (it depends on
what PyTorch's on-disk compile cache, under $TORCHINDUCTOR_CACHE_DIR, already holds: ~15-20 s empty, ~4-6 s
warm). "ours compiled, the step alone" times just the compiled step's calls, without the prompt's prefill,
sampling and the generation loop: the per-token cost to hold against the bound's step.

Every contender is warmed up once, then the contenders run in turn --repeats times (interleaved, so a burst
of load from other processes hits all of them) and the median is reported.

    .venv/bin/python benchmarks/decode.py [--new-tokens 100] [--prompt-tokens 10] [--batch-size 1] [--repeats 3]
        [--threads N] [--ours-default fp32|bf16] [--dtypes fp32,bf16] [--no-uncached] [--no-compile] [--profile]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

PROMPT_LEN = 10  # the default --prompt-tokens
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_VS_HF = 1.5  # ours (its default) / transformers (its default)
TARGET_VS_BOUND = 0.85  # ours / weight-streaming bound, same dtype
BOUND_LINEAR = "matvec bound, F.linear"
BOUND_PACKED = "matvec bound, oneDNN packed"
PACKED = "ours, every linear packed"
DEFAULT_EAGER = "ours, packed where it pays (CLI default before its step is built)"  # model.packed.packing_pays
DEFAULT = "ours, CLI default (compiled-ahead step)"  # model/aot.py: the step compiled once, loaded from disk
COMPILED = "ours compiled (generate --compile)"
COMPILED_STEP = "ours compiled, the step alone"
OURS = ("ours (KV cache)", PACKED, DEFAULT_EAGER, DEFAULT, COMPILED)


def build_ours(dtype: torch.dtype):
    from llmscratch import GPT, ModelConfig

    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("gpt2-124m")).to(dtype).eval()


def build_hf(dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def ours_decode(model, prompt: torch.Tensor, new_tokens: int, use_cache: bool,
                compile: bool = False, compiled_ahead: bool = False) -> list[list[int]]:
    from llmscratch.generate import generate_ids

    more = {"compiled_ahead": True} if compiled_ahead else {}
    out = [t.tolist() for t in generate_ids(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache,
                                           compile=compile, **more)]
    assert len(out) == new_tokens, f"ours produced {len(out)} of {new_tokens} tokens"
    return out


@torch.inference_mode()
def compiled_steps(model, new_tokens: int, prompt_len: int, batch_size: int) -> None:
    """`new_tokens` calls of the model's compiled decoding step alone — no prefill, no sampling, no Python loop
    of `generate_ids` — on the KV cache its last `generate_ids(..., compile=True)` call left in place: what a
    token costs once generation is under way, comparable with the matvec bound's one step."""
    from llmscratch.generate import compiled_decode_step

    step = compiled_decode_step(model)
    idx = torch.zeros(batch_size, 1, dtype=torch.long)
    pos = torch.tensor(prompt_len)
    step(idx, pos)  # the first call of a generation checks Dynamo's guards, as generate_ids' does
    for i in range(1, new_tokens):
        pos.fill_(prompt_len + i)
        step(idx, pos, same_shapes=True)


@torch.inference_mode()
def hf_decode(model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    """transformers' greedy `generate` of exactly `new_tokens` tokens; the first row's. No end-of-sequence token,
    as ours decodes: with the config's, `min_new_tokens` would mask that token's logit at every step (extra work,
    and greedy tokens that differ from ours wherever it is the argmax)."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                         pad_token_id=0, eos_token_id=None)
    assert out.size(1) - prompt.size(1) == new_tokens, "transformers stopped early"
    return out[0, prompt.size(1):].tolist()


def step_weights(model) -> list[torch.Tensor]:
    """The weight matrices one decode step streams, in order: per layer qkv, proj, fc, proj; the LM head."""
    ws = []
    for block in model.blocks:
        ws += [block.attn.qkv.weight, block.attn.proj.weight, block.mlp.fc.weight, block.mlp.proj.weight]
    return ws + [model.lm_head.weight]


@torch.inference_mode()
def bound_decode(weights: list[torch.Tensor], inputs: dict[int, torch.Tensor], new_tokens: int) -> None:
    for _ in range(new_tokens):
        for w in weights:
            F.linear(inputs[w.size(1)], w)


def onednn_packing_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack `dtype` weights here (`llmscratch.model.packed.can_pack`: bf16 needs AVX-512 or
    AMX; on an AVX2-only CPU only fp32 packs)."""
    try:
        from llmscratch.model.packed import can_pack
    except ImportError:  # a src that predates it (see pack_linears): fp32 only
        return dtype == torch.float32 and torch.backends.mkldnn.is_available()
    return can_pack(torch.nn.Linear(8, 8, dtype=dtype))


def onednn_pack(w: torch.Tensor) -> torch.Tensor:
    """`w` (out, in) reordered into oneDNN's blocked layout for a batch of 1 (what inductor's CPU freezing
    pass does to linear weights); only `onednn_linear` can use the result."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@torch.inference_mode()
def packed_bound_decode(packed: list[tuple[torch.Tensor, int]], inputs: dict[int, torch.Tensor],
                        new_tokens: int) -> None:
    for _ in range(new_tokens):
        for w, in_features in packed:
            onednn_linear(inputs[in_features], w, None)


def pack_linears(model, where_faster: bool = False):
    """Pack `model`'s linear weights for oneDNN (llmscratch.model.packed): every one, or with `where_faster` only
    those whose shape packing speeds up on this CPU, as the CLI's `generate` does. With a src that predates that
    module, every one, done here by patching each nn.Linear's forward."""
    try:
        from llmscratch.model.packed import pack_for_cpu_inference
    except ImportError:
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                packed, bias = onednn_pack(mod.weight), mod.bias
                mod.forward = lambda x, packed=packed, bias=bias: onednn_linear(x, packed, bias)
        return model
    try:
        packed = pack_for_cpu_inference(model, where_faster=where_faster)
    except TypeError:  # a src before the per-shape choice: it packed every linear
        packed = pack_for_cpu_inference(model)
    if not packed and not where_faster:
        raise RuntimeError("llmscratch.model.packed could not pack this model")
    return model


def compiled_ahead_ready(model, batch_size: int, label: str) -> bool:
    """Build (or find) `model`'s compiled-ahead decoding step in llmscratch's cache folder, as the CLI's first
    `generate` of this shape starts in the background, and say how long building and loading took. False where
    this src or the model has none."""
    import time

    try:
        from llmscratch.model import aot
    except ImportError:
        return False
    os.environ[aot.ENV] = "load"  # the benchmark builds in the foreground; no background builds
    if aot.unsupported(model, batch_size):
        print(f"{label}: no compiled-ahead step ({aot.unsupported(model, batch_size)})")
        return False
    start = time.perf_counter()
    built = aot.load_step(model, batch_size) is None
    if built:
        aot.build(model, batch_size)
    built_s = time.perf_counter() - start
    start = time.perf_counter()
    loaded = aot.load_step(model, batch_size) is not None
    print(f"{label}: compiled-ahead step {'built in' if built else 'found in the cache folder, looked up in'} "
          f"{built_s:.1f} s; loading it takes {1e3 * (time.perf_counter() - start):.0f} ms")
    return loaded


def profile_ours(model, prompt: torch.Tensor, new_tokens: int, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours_decode(model, prompt, new_tokens, use_cache=True)
    print(f"\nprofile of ours (KV cache, {label}), {new_tokens} tokens, top ops by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_LEN,
                        help="prompt length; long prompts weigh the prefill (tokens/s still counts new tokens)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender; the median is shown")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    parser.add_argument("--ours-default", choices=sorted(DTYPES), default=None,
                        help="the weights dtype our generation uses by default (default: what "
                             "llmscratch.runtime.inference_dtype('auto') picks on this CPU)")
    parser.add_argument("--no-uncached", action="store_true", help="skip ours without the KV cache (slow)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip ours compiled (its first call compiles for ~4-20 s per dtype)")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table of ours")
    args = parser.parse_args()
    if min(args.new_tokens, args.repeats, args.prompt_tokens, args.batch_size) < 1:
        parser.error("--new-tokens, --prompt-tokens, --batch-size and --repeats must be positive")
    if args.prompt_tokens + args.new_tokens > 1024:
        parser.error("--prompt-tokens + --new-tokens must fit GPT-2's context of 1024")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes takes a comma-separated subset of {','.join(DTYPES)}")

    transformers = C.require("transformers", "pip install 'llmscratch[bench]' (or: pip install transformers)")
    threads = C.set_threads(args.threads)
    device = torch.device("cpu")
    args.ours_default = args.ours_default or C.ours_default_precision(device, "generate")
    print(C.header("decode benchmark", device, f"transformers {transformers.__version__}"))
    print(f"GPT-2 124M shape, random weights, batch {args.batch_size}, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new "
          f"tokens greedy, median of {args.repeats} interleaved runs after one warm-up each")

    torch.manual_seed(1234)
    B = args.batch_size
    prompt = torch.randint(0, 50257, (B, args.prompt_tokens))
    n = args.new_tokens

    # (contender, dtype) -> a call that runs it once (and records its tokens)
    contenders: dict[tuple[str, str], callable] = {}
    outputs: dict[tuple[str, str], list[int]] = {}
    for d in dtypes:
        packing = onednn_packing_available(DTYPES[d])
        ours = build_ours(DTYPES[d])
        hf = build_hf(DTYPES[d])
        weights = [w.detach() for w in step_weights(ours)]
        inputs = {k: torch.randn(B, k, dtype=DTYPES[d]) for k in {w.size(1) for w in weights}}

        def record(key, fn):
            contenders[key] = lambda: outputs.__setitem__(key, fn())

        record(("ours (KV cache)", d), lambda m=ours: ours_decode(m, prompt, n, use_cache=True))
        if packing:
            packed_model = pack_linears(build_ours(DTYPES[d]))
            record((PACKED, d), lambda m=packed_model: ours_decode(m, prompt, n, use_cache=True))
        # what `llmscratch generate` runs: packed where packing pays (nowhere, where this dtype cannot pack)
        default_model = pack_linears(build_ours(DTYPES[d]), where_faster=True)
        record((DEFAULT_EAGER, d), lambda m=default_model: ours_decode(m, prompt, n, use_cache=True))
        if compiled_ahead_ready(default_model, B, d):
            record((DEFAULT, d), lambda m=default_model: ours_decode(m, prompt, n, use_cache=True,
                                                                    compiled_ahead=True))
        if not args.no_compile:
            compiled_model = build_ours(DTYPES[d])
            if packing:  # as `generate --compile` runs
                compiled_model = pack_linears(compiled_model)
            record((COMPILED, d), lambda m=compiled_model: ours_decode(m, prompt, n, use_cache=True, compile=True))
            # (after COMPILED, whose KV cache it decodes on)
            contenders[(COMPILED_STEP, d)] = lambda m=compiled_model: compiled_steps(m, n, args.prompt_tokens, B)
        if not args.no_uncached:
            record(("ours (no cache)", d), lambda m=ours: ours_decode(m, prompt, n, use_cache=False))
        record(("transformers generate", d), lambda m=hf: hf_decode(m, prompt, n))
        contenders[(BOUND_LINEAR, d)] = lambda w=weights, x=inputs: bound_decode(w, x, n)
        if packing:
            packed = [(onednn_pack(w), w.size(1)) for w in weights]
            contenders[(BOUND_PACKED, d)] = lambda w=packed, x=inputs: packed_bound_decode(w, x, n)

    warm_up_s = {}
    for key, fn in contenders.items():  # warm-up: kernels chosen, caches allocated, lazy imports done, compiled
        warm_up_s[key] = C.timed(fn, device)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in contenders}
    for _ in range(args.repeats):
        for key, fn in contenders.items():
            times[key].append(C.timed(fn, device))

    rate = {k: B * n / C.median(v) for k, v in times.items()}
    bounds = (BOUND_LINEAR, BOUND_PACKED)
    # The machine's bound at a dtype: the faster of the two ways of streaming the same weights.
    bound = {d: max(rate[(b, d)] for b in bounds if (b, d) in rate) for d in dtypes}
    rows = []
    for (name, d), r in rate.items():
        hf_r = rate.get(("transformers generate", d))
        runs = " ".join(f"{B * n / t:.1f}" for t in times[(name, d)])
        rows.append([name, d, f"{r:.1f}", f"{1e3 * B / r:.1f}", runs,
                     f"{r / hf_r:.2f}" if name not in bounds + (COMPILED_STEP,) else "", f"{r / bound[d]:.0%}"])
    print()
    print(C.markdown_table(["contender", "dtype", "tok/s", "ms/step", "runs (tok/s)",
                            "÷ transformers (same dtype)", "÷ bound (same dtype)"], rows, "llrrrrr"))
    print("bound = the faster matvec chain of the two at that dtype (every weight matrix of one step read once)")

    print()
    # Our default is what `llmscratch generate` runs: runtime's 'auto' dtype, linears packed where that pays.
    default_key = (next((k for k in (DEFAULT, DEFAULT_EAGER) if (k, args.ours_default) in rate), "ours (KV cache)"),
                   args.ours_default)
    hf_default = ("transformers generate", "fp32")
    if default_key in rate and hf_default in rate:
        r = rate[default_key] / rate[hf_default]
        print(f"ours at its default ('{default_key[0]}', {args.ours_default} = llmscratch.runtime 'auto') "
              f"÷ transformers at its default (fp32): {r:.2f} ({C.verdict(r, TARGET_VS_HF)})")
    if hf_default in rate:
        for key in [(name, d) for name in OURS for d in DTYPES]:
            if key in rate and key != default_key:
                r = rate[key] / rate[hf_default]
                print(f"{key[0]} {key[1]} ÷ transformers at its default (fp32), were it our default: {r:.2f} "
                      f"({C.verdict(r, TARGET_VS_HF)})")
    for d in dtypes:
        for name in OURS:
            if (name, d) not in rate:
                continue
            r = rate[(name, d)] / rate[("transformers generate", d)]
            b = rate[(name, d)] / bound[d]
            print(f"{d}: {name} ÷ transformers {r:.2f}; ÷ bound {b:.0%} ({C.verdict(b, TARGET_VS_BOUND)})")
        if (COMPILED_STEP, d) in rate:  # no transformers ratio: that one includes prefill and sampling
            b = rate[(COMPILED_STEP, d)] / bound[d]
            print(f"{d}: {COMPILED_STEP} (no prefill, no sampling) ÷ bound {b:.0%} "
                  f"({C.verdict(b, TARGET_VS_BOUND)})")
        print(f"{d}: bound {bound[d]:.1f} tok/s = {1e3 / bound[d]:.1f} ms/step ("
              + ", ".join(f"{b.split(', ')[1]} {rate[(b, d)]:.1f}" for b in bounds if (b, d) in rate) + ")")
    if "fp32" in dtypes and not args.no_uncached:
        same = outputs[("ours (KV cache)", "fp32")] == outputs[("ours (no cache)", "fp32")]
        print(f"check: fp32 greedy tokens with and without the cache {'agree' if same else 'DIFFER'}")
    for d in dtypes:
        for name in (PACKED, DEFAULT_EAGER, DEFAULT, COMPILED):
            if (name, d) in outputs:
                same = outputs[(name, d)] == outputs[("ours (KV cache)", d)]
                print(f"check: {d} greedy tokens of '{name}' and plain ours {'agree' if same else 'DIFFER'}")
    for d in dtypes:
        if (COMPILED, d) in warm_up_s:
            print(f"{d}: first call of '{COMPILED}' (compiles the step) {warm_up_s[(COMPILED, d)]:.1f} s; "
                  f"timed calls {C.median(times[(COMPILED, d)]):.2f} s")
    note = C.contention_note(threads)
    print(f"load avg (1/5/15 min) at end: {C.load_average()}" + (f"\n{note}" if note else ""))

    if args.profile:
        for d in dtypes:
            profile_ours(build_ours(DTYPES[d]), prompt, n, d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
