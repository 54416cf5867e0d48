"""FP8 against bf16 training, loss parity and speed, through `llmscratch pretrain` (issue 27, item 1).

    python benchmarks/gpu_fp8.py                          # one H100/H200: GPT-2 124M, 300 steps each, ≈3 min
    python benchmarks/gpu_fp8.py --tiny --device cpu      # dry run of the logic on a CPU (fp8 emulated)

Each precision runs `llmscratch pretrain` (its function, `run_pretrain`) in its own process on the same prepared
data (the stdlib's docstrings, `pydocs`, with a 4096-token BPE: real text, offline), the same seed and so the
same batches, with the trainer's defaults for the device (compiled, bf16 residual stream on CUDA).
`--train.precision fp8` trains the blocks' linears through torchao's Float8Linear (`llmscratch.train.fp8`); bf16
is the reference. Printed: both training loss curves every `--log-every` steps, their largest relative gap over
the second half of the run, the final validation losses, and the median tokens/s and MFU the trainer logged
after the first logging window (compilation). Parity passes when the final validation losses are within 1.5%
and the second half's training losses within 3% at every logged step.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import _common as C  # noqa: E402
import torch  # noqa: E402
from scaling import _prepare  # noqa: E402  (the pydocs data set with a 4096-token BPE)

VAL_TOLERANCE, TRAIN_TOLERANCE = 0.015, 0.03


CHILD = """
import json, sys
from llmscratch.train.pretrain import run_pretrain
from llmscratch.train.trainer import TrainConfig
a = json.loads(sys.argv[1])
run_pretrain(model=a["model"], data=a["data"], out=a["out"], context_length=a["context"], progress=False,
             train_cfg=TrainConfig(**a["train"]))
"""


def run(precision: str, data: Path, out: Path, args) -> dict:
    """One run of `llmscratch pretrain` (its function, `run_pretrain`, in a child process of its own: the lent GPU
    machine lacks the CLI's argument parser) at `precision`; its metrics as {"train": [(step, loss)], "val":
    loss, "tok_s": median, "mfu": median or None, "wall_s": seconds}."""
    train = dict(precision=precision, device=args.device, max_steps=args.steps, batch_size=args.batch_size,
                 warmup_steps=max(1, args.steps // 10), lr=args.lr, log_every=args.log_every,
                 eval_every=args.steps, eval_batches=args.eval_batches, save_every=args.steps, seed=1337,
                 progress=False)
    if args.tiny:
        train["compile"] = False
    spec = dict(model=args.model, data=str(data), out=str(out), context=args.context, train=train)
    path = os.pathsep.join(filter(None, ["src", os.environ.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=path))
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{precision} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = [(int(r["step"]), float(r["train_loss"])) for r in rows if r["kind"] == "train"]
    val = [float(r["val_loss"]) for r in rows if r["kind"] == "eval" and r.get("val_loss")]
    rates = [r for r in rows if r["kind"] == "train"][1:] or [r for r in rows if r["kind"] == "train"]
    mfus = [float(r["mfu"]) for r in rates if r.get("mfu")]
    return {"train": train, "val": val[-1] if val else float("nan"),
            "tok_s": statistics.median(float(r["tokens_per_s"]) for r in rates),
            "mfu": statistics.median(mfus) if mfus else None, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="gpt2-124m", help="a preset (its vocabulary becomes the BPE's 4096)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--precisions", default="bf16,fp8", help="the first is the reference")
    ap.add_argument("--tiny", action="store_true", help="gpt-micro, context 64, 40 steps: a dry run of the logic")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.context, args.steps, args.batch_size, args.log_every, args.eval_batches = \
            "gpt-micro", 64, 40, 4, 5, 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (for a dry run: --tiny --device cpu)")
    print(C.header("FP8 against bf16 training (issue 27)", device), flush=True)
    print(f"\n{args.model}, context {args.context}, micro-batch {args.batch_size}, {args.steps} steps, lr "
          f"{args.lr:g}, pydocs with a 4096-token BPE\n", flush=True)
    precisions = [p for p in args.precisions.split(",") if p]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = _prepare(Path(tmp))
        print(f"data prepared in {time.perf_counter() - t0:.0f} s", flush=True)
        for p in precisions:
            try:
                results[p] = run(p, data, Path(tmp) / p, args)
                r = results[p]
                mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] is not None else ""
                print(f"  {p}: {r['tok_s']:,.0f} tok/s{mfu}, final val loss {r['val']:.4f}, "
                      f"{r['wall_s']:.0f} s in all", flush=True)
            except RuntimeError as e:
                print(f"  {p}: FAILED\n{e}", flush=True)
    if len(results) < 2 or precisions[0] not in results:
        return 1
    ref_name = precisions[0]
    ref = results[ref_name]
    others = [p for p in precisions[1:] if p in results]
    steps = [s for s, _ in ref["train"]]
    print()
    print(C.markdown_table(["step", *[f"{p} train loss" for p in [ref_name, *others]]],
                           [[s, *[f"{dict(results[p]['train']).get(s, float('nan')):.4f}" for p in [ref_name, *others]]]
                            for s in steps]))
    print()
    rows = []
    ok = True
    for p in others:
        mine = dict(results[p]["train"])
        half = [s for s in steps if s > args.steps // 2 and s in mine]
        gap = max(abs(mine[s] - dict(ref["train"])[s]) / dict(ref["train"])[s] for s in half) if half else float("nan")
        val_gap = abs(results[p]["val"] - ref["val"]) / ref["val"]
        passed = gap < TRAIN_TOLERANCE and val_gap < VAL_TOLERANCE
        ok &= passed
        rows.append([p, f"{results[p]['val']:.4f}", f"{val_gap:.2%}", f"{gap:.2%}",
                     f"{results[p]['tok_s'] / ref['tok_s']:.2f}", "PASS" if passed else "FAIL"])
    print(C.markdown_table(["precision", "final val loss", f"val gap to {ref_name}", "largest train gap, 2nd half",
                            f"tokens/s ÷ {ref_name}", "parity"],
                           [[ref_name, f"{ref['val']:.4f}", "—", "—", "1.00", "reference"], *rows]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
