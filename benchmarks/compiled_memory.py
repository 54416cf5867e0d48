"""Memory of compiled CPU decoding (`generate --compile` / `generate_ids(..., compile=True)`).

The compiled CPU step takes the weights as inputs (llmscratch.generate.CompiledDecodeStep), so it should hold
no copy of its own. This loads GPT-2 124M (random weights, bf16), packs its linears as `llmscratch generate`
does, and prints the process's resident memory after an eager generation and after each of --generations
compiled ones, changing the weights in place in between (a training step would), with the seconds each took.
Before this design the step froze a packed copy of the weights into itself: ~+240 MB for this model, and one
more copy per rebuild after every change until the previous one was released.

    .venv/bin/python benchmarks/compiled_memory.py [--generations 3] [--no-pack]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=3, help="compiled generations of 20 tokens")
    parser.add_argument("--no-pack", action="store_true", help="keep plain nn.Linear layers (not the CLI's way)")
    args = parser.parse_args()
    if args.generations < 1:
        parser.error("--generations must be positive")
    if not Path("/proc/self/statm").exists():
        sys.exit("error: this benchmark reads /proc/self/statm (Linux)")

    from llmscratch import GPT, ModelConfig
    from llmscratch.generate import generate_ids
    from llmscratch.model.packed import pack_for_cpu_inference

    print(C.header("compiled decoding memory", torch.device("cpu")))
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt2-124m")).to(torch.bfloat16).eval()
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    packed = 0 if args.no_pack else pack_for_cpu_inference(model)
    prompt = torch.randint(0, 50257, (1, 10))
    gc.collect()
    rows = [["model built" + (f", {packed} linears packed" if packed else ""), f"{resident_mb():,.0f}", ""]]

    def run(label: str, compile: bool) -> None:
        start = time.perf_counter()
        list(generate_ids(model, prompt, 20, compile=compile))
        gc.collect()
        rows.append([label, f"{resident_mb():,.0f}", f"{time.perf_counter() - start:.1f}"])

    run("eager generation", compile=False)
    for i in range(args.generations):
        run(f"compiled generation {i + 1}" + (" (compiles)" if i == 0 else ", after a weight change"), True)
        with torch.no_grad():
            model.norm.weight.mul_(1.0)  # an in-place change, as an optimizer step makes
    print(f"GPT-2 124M, bf16 weights {weights_mb:.0f} MB")
    print(C.markdown_table(["after", "RSS (MB)", "seconds"], rows, "lrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
