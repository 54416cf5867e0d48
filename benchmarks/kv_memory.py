"""KV-cache memory at a long context for MHA, GQA, MLA and sliding-window attention in models of about 1B
parameters: the estimate of `llmscratch.model.memory` for the whole model, checked against caches really allocated.

For each shape the whole model is built on the meta device (weights as shapes only) and its cache set up there:
the buffers' sizes must equal the estimate. Then a reduced model of a few layers (one period of a local:global
pattern) gets a real cache on the CPU (or --device cuda), every byte written, in a fresh process (so no memory that
an earlier cache freed is reused), and that process's resident memory (or CUDA's allocated bytes) is measured
before and after; those layers' estimate is printed beside it.

    .venv/bin/python benchmarks/kv_memory.py [--context 32768] [--batch-size 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor

import torch
from _common import header, markdown_table

from llmscratch.config import ModelConfig
from llmscratch.model import GPT
from llmscratch.model.memory import attention_variant, format_bytes, kv_bytes_per_token, kv_cache_bytes


def shapes(context: int) -> dict[str, ModelConfig]:
    """~1B-parameter shapes of each variant. Llama 3.2 1B is the GQA model; the MHA one gives it a key/value head
    per query head; the MLA one has DeepSeek-V2-Lite's attention (16 heads, 128 + 64 wide queries and keys, a
    512-wide latent) on Llama's body; the SWA one has Gemma 3's 5:1 pattern and 512-position window on Llama's
    body; and Gemma 3 1B itself (one KV head of 256, a 5:1 pattern)."""
    llama = ModelConfig.from_preset("llama3.2-1b", context_length=max(context, 131072))
    pattern = ["full" if (i + 1) % 6 == 0 else "sliding" for i in range(llama.n_layers)]
    return {
        "MHA (llama3.2-1b, 32 KV heads)": llama.replace(n_kv_heads=32),
        "GQA (llama3.2-1b)": llama,
        "MLA (llama3.2-1b body, V2-Lite attention)": llama.replace(
            attention="mla", n_heads=16, n_kv_heads=16, head_dim=128, rope_head_dim=64, kv_lora_rank=512),
        "GQA + SWA 512, 5:1 (llama3.2-1b)": llama.replace(layer_types=pattern, sliding_window=512),
        "gemma3-1b": ModelConfig.from_preset("gemma3-1b", context_length=max(context, 32768)),
    }


def meta_cache_bytes(cfg: ModelConfig, batch_size: int, positions: int) -> tuple[int, int]:
    """(parameters, bytes of the bf16 cache buffers) of the whole model, built and cached on the meta device."""
    with torch.device("meta"):
        model = GPT(cfg)
    model.setup_kv_cache(batch_size, positions, dtype=torch.bfloat16, device="meta")
    return model.num_params(), sum(t.nbytes for b in model.blocks for t in b.attn.kv_cache.buffers())


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def measured_bytes(cfg: ModelConfig, batch_size: int, positions: int, device: torch.device) -> int:
    """Memory a real bf16 cache of `cfg` takes on `device`: growth of CUDA's allocated bytes, or of this process's
    resident set once every byte of the cache is written (a fresh allocation's pages are not resident yet)."""
    with torch.device("meta"):
        model = GPT(cfg)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else resident_bytes()
    model.setup_kv_cache(batch_size, positions, dtype=torch.bfloat16, device=device)
    for block in model.blocks:
        for t in block.attn.kv_cache.buffers():
            t.fill_(1.0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        used = torch.cuda.memory_allocated(device) - before
    else:
        used = resident_bytes() - before
    model.clear_kv_cache()
    return used


def reduced(cfg: ModelConfig) -> ModelConfig:
    """The first layers of `cfg`: one period of its local:global pattern (through the first full layer), else 2."""
    n = cfg.sliding_layers.index(False) + 1 if any(cfg.sliding_layers) else 2
    return cfg.replace(n_layers=n, layer_types=cfg.layer_types[:n] if cfg.layer_types else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768, help="positions cached per sequence")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where the reduced model's real cache goes (cpu, cuda)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(header("KV-cache memory (bf16)", device, f"context {args.context}, batch {args.batch_size}"))
    rows, mismatches = [], 0
    for name, cfg in shapes(args.context).items():
        params, meta = meta_cache_bytes(cfg, args.batch_size, args.context)
        estimate = kv_cache_bytes(cfg, args.context, 2, args.batch_size)
        small = reduced(cfg)
        small_estimate = kv_cache_bytes(small, args.context, 2, args.batch_size)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fresh:
            real = fresh.submit(measured_bytes, small, args.batch_size, args.context, device).result()
        agree = meta == estimate and abs(real - small_estimate) <= 0.01 * small_estimate + 2**20
        mismatches += not agree
        rows.append([name, attention_variant(cfg), f"{params / 1e9:.2f}B",
                     format_bytes(kv_bytes_per_token(cfg) * args.batch_size), format_bytes(estimate),
                     "=" if meta == estimate else format_bytes(meta),
                     f"{small.n_layers}", format_bytes(small_estimate), format_bytes(real),
                     "yes" if agree else "NO"])
    print(markdown_table(["model", "attention", "params", "per token", f"estimate @{args.context}",
                          "meta alloc", "layers", "their estimate", "measured", "agree"], rows, "llrrrrrrrl"))
    print("per token: growth per token while shorter than every window; meta alloc: the whole model's cache "
          "buffers on the meta device ('=' when equal to the estimate); measured: a real cache of the first "
          f"layers on {device.type}, every byte written ({'allocated bytes' if device.type == 'cuda' else 'RSS'} "
          "growth); agree: meta equal and measured within 1% + 1 MiB.")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
