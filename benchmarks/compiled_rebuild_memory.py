"""Memory of rebuilt compiled CPU decoding steps (`generate --compile` / `generate_ids(..., compile=True)`).

A compiled CPU step freezes the weights into itself, so after the weights change (a training step, a LoRA
merge) the next compiled generation builds a new step. This decodes 5 tokens with GPT-2 124M (random weights,
bf16) --builds times, changing the weights in place in between, and prints the process's resident memory after
each build. With the replaced steps' frozen weights released (llmscratch.generate.CompiledDecodeStep.release)
it stays flat; without, it grows by one weight copy (~240 MB) per build.

    .venv/bin/python benchmarks/compiled_rebuild_memory.py [--builds 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--builds", type=int, default=3, help="compiled steps to build (each ~20-30 s here)")
    args = parser.parse_args()
    if args.builds < 1:
        parser.error("--builds must be positive")
    if not Path("/proc/self/statm").exists():
        sys.exit("error: this benchmark reads /proc/self/statm (Linux)")

    from llmscratch import GPT, ModelConfig
    from llmscratch.generate import generate_ids

    device = torch.device("cpu")
    print(C.header("compiled decoding rebuild memory", device))
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt2-124m")).to(torch.bfloat16).eval()
    prompt = torch.randint(0, 50257, (1, 10))
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    print(f"GPT-2 124M, bf16 weights {weights_mb:.0f} MB; RSS before the first build {resident_mb():.0f} MB")
    rows = []
    for build in range(args.builds):
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "weights changed: compiling again" warning
            list(generate_ids(model, prompt, 5, compile=True))
        gc.collect()
        rows.append([build + 1, f"{resident_mb():,.0f}", f"{time.perf_counter() - start:.0f}"])
        with torch.no_grad():
            model.lm_head.weight.mul_(1.0)  # an in-place change: the next generation must rebuild the step
    print(C.markdown_table(["build", "RSS after it (MB)", "seconds"], rows, "rrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
