"""Data-parallel scaling: training tokens/s of `llmscratch pretrain` as one process and under torchrun with more.

    python benchmarks/scaling.py                      # CPU: 1 process (all cores) vs 2 processes (half each)
    python benchmarks/scaling.py --gpus               # CUDA: 1, 2, ... up to every GPU, one process per GPU

Each run trains the same model on the same prepared data with the same global batch; the throughput is the
median `tokens_per_s` that rank 0 logged after the first few steps (warm-up, compile). Efficiency = tokens/s at N
processes / (N × tokens/s at 1). On a CPU the cores are split between the processes (OMP threads), so the ideal
there is 1× — the CPU rows show the overhead of gradient all-reduce over gloo, not a speed-up. The data is the
stdlib corpus (pydocs) prepared once with a quickly trained BPE, in a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _prepare(root: Path) -> Path:
    """A 4096-token BPE trained on a sample of pydocs, and pydocs prepared with it."""
    from llmscratch.data import load_corpus
    from llmscratch.tokenizer import BPETokenizer, load_tokenizer
    from llmscratch.train.pretrain import prepare

    docs = load_corpus("pydocs", progress=False)
    BPETokenizer.train(docs[:400], 4096, progress=False).save(root / "tok")
    prepare("pydocs", load_tokenizer(root / "tok"), root / "data", progress=False)
    return root / "data"


def _run(n: int, data: Path, out: Path, args, threads: int | None) -> float:
    launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={n}"]
    argv = [*launcher, "-m", "llmscratch", "pretrain", "--model", args.model, "--data", str(data), "--out",
            str(out), "--train.max_steps", str(args.steps), "--train.batch_size", str(args.batch),
            "--train.log_every", "1", "--train.eval_every", str(args.steps), "--train.eval_batches", "1",
            "--train.save_every", str(args.steps), "--train.warmup_steps", "2", "--train.strategy", args.strategy,
            "--train.device", "cuda" if args.gpus else "cpu", "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{n} process(es) failed:\n{r.stderr[-2000:]}")
    with open(out / "metrics.csv", newline="") as f:
        rates = [float(row["tokens_per_s"]) for row in csv.DictReader(f) if row["kind"] == "train"]
    return statistics.median(rates[args.skip:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", action="store_true", help="one process per CUDA device, 1..all of them")
    ap.add_argument("--model", default="gpt-tiny")
    ap.add_argument("--strategy", default="ddp", help="ddp | fsdp")
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--skip", type=int, default=4, help="steps left out of the median (warm-up)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    if args.gpus:
        import torch

        counts = list(range(1, torch.cuda.device_count() + 1))
        if not counts:
            raise SystemExit("no CUDA device here")
    else:
        counts = [1, 2]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = _prepare(root)
        rows = []
        for n in counts:
            threads = None if args.gpus else max(1, cores // n)
            rate = _run(n, data, root / f"run-{n}", args, threads)
            rows.append((n, threads, rate))
            print(f"{n} process(es){'' if threads is None else f' × {threads} threads'}: {rate:,.0f} tok/s",
                  flush=True)
    base = rows[0][2]
    print(f"\n{args.model}, {args.strategy}, global batch {args.batch}, {'CUDA' if args.gpus else 'CPU'}")
    print("| processes | threads each | tokens/s | efficiency |")
    print("|---:|---:|---:|---:|")
    for n, threads, rate in rows:
        ideal = base * (n if args.gpus else 1)  # on a CPU the same cores are split, so the ideal is no loss
        print(f"| {n} | {threads or '-'} | {rate:,.0f} | {rate / ideal:.0%} |")


if __name__ == "__main__":
    main()
