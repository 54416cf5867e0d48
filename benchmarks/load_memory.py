"""Peak memory of loading a checkpoint: a random gpt2-1558m-shaped checkpoint is written, then loaded by
`llmscratch.checkpoint.load_model` in a fresh process; peak RSS above that process's baseline (Python + torch
imported) is divided by the weights file's size. Target: ≤ 1.15 (the model is built on the meta device and
filled from the memory-mapped file with `assign=True`, so no second copy of the weights is ever made).

    .venv/bin/python benchmarks/load_memory.py [--preset gpt2-1558m] [--dtype fp32] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import sys, time
def hwm():  # peak resident set size (VmHWM) of this process, bytes
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
# The high-water mark is inherited through fork from the parent, which held the whole model: reset it.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
import torch, llmscratch.checkpoint as ck
base = hwm()
n, took = 0, 0.0
if sys.argv[2] == "load":
    t = time.perf_counter()
    model = ck.load_model(sys.argv[1])
    n = sum(p.numel() for p in model.parameters())
    took = time.perf_counter() - t
after_load = hwm()
if sys.argv[2] == "load":  # read every weight once, as a forward pass would: all pages become resident
    with torch.no_grad():
        total = sum(float(p.float().sum()) if p.dtype != torch.float32 else float(p.sum()) for p in model.parameters())
print(base, after_load, hwm(), n, took)
"""

def measure(folder: Path, mode: str) -> tuple[int, int, int, int, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return int(out[0]), int(out[1]), int(out[2]), int(out[3]), float(out[4])


def main() -> int:
    import torch

    from llmscratch.checkpoint import save_model
    from llmscratch.config import ModelConfig
    from llmscratch.model import GPT

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-1558m")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: a temp dir)")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "ckpt"
        t = time.perf_counter()
        cfg = ModelConfig.from_preset(args.preset)
        with torch.device("meta"):
            model = GPT(cfg)
        model = model.to_empty(device="cpu").to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        save_model(folder, model)
        del model
        size = (folder / "model.safetensors").stat().st_size
        print(f"wrote a random {args.preset} checkpoint ({args.dtype}, {size / 2**30:.2f} GiB) in "
              f"{time.perf_counter() - t:.0f} s")
        _, _, base_peak, _, _ = measure(folder, "baseline")
        _, after_load, after_touch, n, took = measure(folder, "load")
        print(json.dumps({"preset": args.preset, "dtype": args.dtype, "params": n, "file_bytes": size,
                          "baseline_peak_rss": base_peak, "peak_rss_after_load": after_load,
                          "peak_rss_after_reading_every_weight": after_touch, "load_seconds": round(took, 2)}))
        for label, peak in (("right after load_model (weights still memory-mapped, untouched)", after_load),
                            ("after reading every weight once", after_touch)):
            ratio = (peak - base_peak) / size
            print(f"{label}: peak RSS above baseline / file bytes = {(peak - base_peak) / 2**30:.2f} / "
                  f"{size / 2**30:.2f} GiB = {ratio:.3f} ({'meets' if ratio <= 1.15 else 'MISSES'} target ≤ 1.15)")
        print(f"load_model took {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
