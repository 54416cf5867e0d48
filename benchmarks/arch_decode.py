"""Decoding speed on the CPU of the architectures we load from Hugging Face besides GPT-2: our GPT configured as
Gemma 3 (sliding-window layers with their window-only KV cache, 5:1 local:global) and as Qwen3-MoE (a top-k
router over SwiGLU experts), each against `transformers`' own model holding the same random weights.

Each family (--family; both by default) has two shapes (--shapes):
  gemma3     micro: gemma3-micro's (d_model 64, 6 layers, window 8); small: d_model 512, 12 layers, 4 query
             heads sharing one KV head of 128, window 64, vocabulary 16384. Norms are drawn uniform(-0.5, 0.5),
             away from their init, as trained ones are. Converted by `llmscratch.weights.hf_gemma3`.
  qwen3-moe  micro: the qwen3-moe-micro preset (d_model 64, 2 layers, 8 experts top-2); small: d_model 512,
             8 layers, 16 experts of width 768, top-2, vocabulary 16384. The routers are drawn normal(0, 0.5),
             spread out so that tokens really go to different experts. Converted by `llmscratch.weights.hf_llama`.
transformers builds each model with random weights and saves it; our loader converts that folder, so both sides
hold the same numbers. Batch 1, a --prompt-tokens prompt, greedy decoding of --new-tokens tokens (by default past
both of Gemma's windows); tokens/s counts the new tokens over the whole call, prefill included. Each contender
runs at fp32 and bf16 (--dtypes; weights cast, the same for both).

Ours runs as built (plain nn.Linear), with every linear weight packed for oneDNN (llmscratch.model.packed;
where this CPU can pack that dtype), and packed only where packing pays on this CPU — what `llmscratch
generate` does on a CPU. transformers runs its
default attention (sdpa), its own cache and, for the MoE, its default experts implementation (named in that
family's header). The runner and decoding helpers are benchmarks/decode.py's: per family every contender is
warmed up once, then the contenders run in turn --repeats times (interleaved, so a burst of load from other
processes hits all of them) and the median is reported; a last check compares the fp32 greedy tokens of ours
and transformers. The families run one after the other, each with its own header, table and checks.

    .venv/bin/python benchmarks/arch_decode.py [--family gemma3|qwen3-moe|all] [--new-tokens 64]
        [--prompt-tokens 10] [--repeats 3] [--threads N] [--dtypes fp32,bf16] [--shapes micro,small]
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common as C  # noqa: E402
import decode as D  # noqa: E402
import torch  # noqa: E402

OURS, HF = "ours (KV cache)", "transformers generate"
PACKED, DEFAULT = D.PACKED, D.DEFAULT  # every linear packed; packed only where it pays (the CLI's default)


@dataclass(frozen=True)
class Family:
    title: str  # the header's name, and the summary line's
    hf_config: str  # transformers' config class
    hf_model: str  # transformers' causal-LM class
    loader: str  # "module:function" of ours that converts the saved folder into (model, config)
    shapes: dict[str, dict]  # the config's fields of each shape; max_position_embeddings is the context limit
    redraw: tuple[str, Callable[[torch.Tensor], object]]  # (a substring of the parameters' names, in-place init)
    shown: tuple[str, str]  # (label, config field) listed per shape in the summary line
    config: dict = field(default_factory=dict)  # more config fields, the same for every shape
    experts: bool = False  # whether the header names transformers' experts implementation

    def context(self, shape: str) -> int:
        return self.shapes[shape]["max_position_embeddings"]


FAMILIES = {
    # Gemma3TextConfig fields; layer_types is transformers' default 5:1 pattern.
    "gemma3": Family(
        title="Gemma 3", hf_config="Gemma3TextConfig", hf_model="Gemma3ForCausalLM",
        loader="llmscratch.weights.hf_gemma3:load_hf_gemma3",
        shapes={
            "micro": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                          query_pre_attn_scalar=16, max_position_embeddings=1024),
            "small": dict(vocab_size=16384, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=128, sliding_window=64,
                          query_pre_attn_scalar=128, max_position_embeddings=1024),
        },
        redraw=("norm", lambda p: p.uniform_(-0.5, 0.5)),  # norms away from their init, as trained ones are
        shown=("windows", "sliding_window")),
    # Qwen3MoeConfig fields (a head_dim wider than d_model / n_heads, as Qwen3 has, in the small one).
    "qwen3-moe": Family(
        title="Qwen3-MoE", hf_config="Qwen3MoeConfig", hf_model="Qwen3MoeForCausalLM",
        loader="llmscratch.weights.hf_llama:load_hf_llama",
        shapes={
            "micro": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
                          num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=512),
            "small": dict(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=16,
                          num_experts_per_tok=2, moe_intermediate_size=768, max_position_embeddings=1024),
        },
        redraw=("mlp.gate.weight", lambda p: p.normal_(0.0, 0.5)),  # spread-out routers: tokens go to many experts
        shown=("experts", "num_experts"),
        config=dict(norm_topk_prob=True), experts=True),
}
SHAPES = ("micro", "small")  # every family has these


def build_pair(family: Family, shape: str, folder: Path):
    """(transformers model, our converted model), fp32, eval mode, with the same random weights."""
    import transformers

    module, _, function = family.loader.partition(":")
    load = getattr(importlib.import_module(module), function)
    config = getattr(transformers, family.hf_config)(**family.config, **family.shapes[shape])
    torch.manual_seed(0)
    hf = getattr(transformers, family.hf_model)(config).eval()
    part, init = family.redraw
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if part in name:
                init(p)
    hf.save_pretrained(folder)
    ours, _ = load(folder)
    return hf, ours


def packed_copy(model, where_faster: bool = False):
    """A copy of `model` with its linear weights packed for oneDNN — every one, or with `where_faster` those
    packing speeds up on this CPU, as `llmscratch generate` runs; None where this CPU/dtype cannot pack."""
    from llmscratch.model.packed import can_pack

    return D.pack_linears(copy.deepcopy(model), where_faster) if can_pack(model) else None


def contenders_for(family: Family, shape: str, dtypes: list[str], prompt_len: int, n: int,
                   tmp: Path) -> tuple[dict, set[str]]:
    """({(shape, contender, dtype): a call that decodes once and returns its tokens}, the names of the experts
    implementation transformers chose for its models)."""
    prompt = torch.randint(0, family.shapes[shape]["vocab_size"], (1, prompt_len),
                           generator=torch.Generator().manual_seed(1234))
    out, impls = {}, set()
    for d in dtypes:
        hf, ours = build_pair(family, shape, tmp / f"{shape}-{d}")  # the same weights for every dtype
        hf, ours = hf.to(D.DTYPES[d]), ours.to(D.DTYPES[d])
        impls.add(getattr(hf.config, "_experts_implementation", None) or "eager")
        out[(shape, OURS, d)] = lambda m=ours: [t[0] for t in D.ours_decode(m, prompt, n, use_cache=True)]
        for name, where_faster in ((PACKED, False), (DEFAULT, True)):
            packed = packed_copy(ours, where_faster)
            if packed is not None:
                out[(shape, name, d)] = lambda m=packed: [t[0] for t in D.ours_decode(m, prompt, n, use_cache=True)]
        out[(shape, HF, d)] = lambda m=hf: D.hf_decode(m, prompt, n)
    return out, impls


def run_family(family: Family, shapes: list[str], dtypes: list[str], args, hf_version: str, threads: int) -> None:
    """Build, warm up and time one family's contenders; print its header, table and checks."""
    device = torch.device("cpu")
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as tmp:  # (the converted weights may be memory-mapped from it)
        contenders, impls = {}, set()
        for s in shapes:
            more, impl = contenders_for(family, s, dtypes, args.prompt_tokens, n, Path(tmp))
            contenders.update(more)
            impls |= impl
        extra = f"transformers {hf_version}"
        if family.experts:
            extra += f" (its experts implementation: {', '.join(sorted(impls))})"
        print(C.header(f"{family.title} decode benchmark", device, extra))
        label, key = family.shown
        listed = ", ".join(f"{s} {family.shapes[s][key]}" for s in shapes)
        print(f"{family.title} shapes ({label}: {listed}), random weights, batch 1, prompt {args.prompt_tokens} "
              f"tokens, {n} new tokens greedy, median of {args.repeats} interleaved runs after one warm-up each")
        outputs = {k: fn() for k, fn in contenders.items()}  # warm-up (and the tokens compared below)
        times = {k: [] for k in contenders}
        for _ in range(args.repeats):
            for k, fn in contenders.items():
                times[k].append(C.timed(fn, device))

    rate = {k: n / C.median(v) for k, v in times.items()}
    rows = []
    for (s, name, d), r in rate.items():
        runs = " ".join(f"{n / t:.1f}" for t in times[(s, name, d)])
        rows.append([s, name, d, f"{r:.1f}", f"{1e3 / r:.2f}", runs, f"{r / rate[(s, HF, d)]:.2f}"])
    print()
    print(C.markdown_table(["shape", "contender", "dtype", "tok/s", "ms/token", "runs (tok/s)",
                            "÷ transformers (same dtype)"], rows, "lllrrrr"))
    print()
    if "fp32" in dtypes:
        for s in shapes:
            same = outputs[(s, OURS, "fp32")] == outputs[(s, HF, "fp32")]
            print(f"check: {family.title} {s} fp32 greedy tokens of ours and transformers "
                  f"{'agree' if same else 'DIFFER'}")
    note = C.contention_note(threads)
    print(f"load avg (1/5/15 min) at end: {C.load_average()}" + (f"\n{note}" if note else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="all", help="which architecture to time")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender; the median is shown")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated subset of {','.join(D.DTYPES)}")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {','.join(SHAPES)}")
    args = parser.parse_args()
    if min(args.new_tokens, args.repeats, args.prompt_tokens) < 1:
        parser.error("--new-tokens, --prompt-tokens and --repeats must be positive")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not dtypes or any(d not in D.DTYPES for d in dtypes) or not shapes or any(s not in SHAPES for s in shapes):
        parser.error(f"--dtypes takes a subset of {','.join(D.DTYPES)}, --shapes of {','.join(SHAPES)}")
    families = [FAMILIES[f] for f in (FAMILIES if args.family == "all" else [args.family])]
    for family in families:
        for s in shapes:
            if args.prompt_tokens + args.new_tokens > family.context(s):
                parser.error(f"--prompt-tokens + --new-tokens must fit the context of {family.title} {s}: "
                             f"{family.context(s)}")

    transformers = C.require("transformers", "pip install 'llmscratch[bench]' (or: pip install transformers)")
    threads = C.set_threads(args.threads)
    for i, family in enumerate(families):
        if i:
            print()
        run_family(family, shapes, dtypes, args, transformers.__version__, threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
