"""Peak memory and throughput of `llmscratch prepare` on a text file larger than it should ever hold, against
Hugging Face `tokenizers`' batch encoding of the same file with the same vocabulary.

A ~1 GB text (the stdlib documentation corpus repeated) is written to a temporary folder, a 4096-token BPE is
trained on its first megabyte, and `llmscratch prepare` runs on it in a child process, once with that BPE and once
with GPT-2's (when ../shared/data/gpt2 or $LLMSCRATCH_GPT2_DIR holds its files). The process tree is polled every
50 ms: the peak of its summed RSS, of its summed PSS (shared pages counted once: the workers are forked from the
parent and share its pages, which a sum of RSS counts once per process) and each process's own peak (VmHWM).
Target (issue 25): peak RSS under 500 MB. The contender reads the file in ~64 KB pieces cut at newlines and calls
`Tokenizer.encode_batch_fast` on 64 pieces at a time (Rust threads, every core), keeping only the token count:
the fastest of the piece sizes (4 KB to 1 MB) and both batch calls tried on this machine.

    .venv/bin/python benchmarks/prepare_memory.py [--mb 1000] [--contender-mb N] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED_GPT2 = REPO.parent / "shared" / "data" / "gpt2"

HF_CHILD = r"""
import json, sys, time
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
vocab, merges, path, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = Tokenizer(models.BPE.from_file(vocab, merges))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast: no character offsets
start, tokens, nbytes, batch = time.perf_counter(), 0, 0, []
def flush():
    global tokens, batch
    tokens += sum(len(e.ids) for e in encode(batch))
    batch = []
with open(path, "rb") as f:
    while nbytes < limit:
        piece = f.read(1 << 16)
        if not piece:
            break
        piece += f.readline()  # end the piece at a newline
        nbytes += len(piece)
        batch.append(piece.decode("utf-8"))
        if len(batch) == 64:
            flush()
flush()
print(json.dumps({"tokens": tokens, "bytes": nbytes, "seconds": time.perf_counter() - start}))
"""


def write_corpus(path: Path, megabytes: int) -> int:
    """`megabytes` MB of English prose (pydocs repeated, ending at a newline); returns the size in bytes."""
    from llmscratch.data import pydocs_text

    block = (pydocs_text() + "\n\n").encode("utf-8")
    target = megabytes * 1_000_000
    with open(path, "wb") as f:
        while f.tell() + len(block) <= target:
            f.write(block)
        rest = block[:target - f.tell()]
        f.write(rest[:rest.rfind(b"\n") + 1])
        return f.tell()


def hwm(pid: int) -> int:
    """The process's own peak resident set (VmHWM), bytes; 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def measured(argv: list[str], env: dict | None = None) -> dict:
    """Run `argv`, polling its process tree; returns wall seconds, the peaks, the stdout and the exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    root = psutil.Process(proc.pid)
    peak = {"rss_sum": 0, "pss_sum": 0, "hwm_max": 0, "processes": 1}
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        rss = pss = 0
        for p in tree:
            try:
                info = p.memory_full_info()  # PSS reads smaps_rollup
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss = rss + info.rss, pss + info.pss
            peak["hwm_max"] = max(peak["hwm_max"], hwm(p.pid))
        peak["rss_sum"], peak["pss_sum"] = max(peak["rss_sum"], rss), max(peak["pss_sum"], pss)
        peak["processes"] = max(peak["processes"], len(tree))
        time.sleep(0.05)
    out, err = proc.communicate()
    return {**peak, "seconds": time.perf_counter() - start, "stdout": out, "stderr": err, "code": proc.returncode}


def hf_files_for(tokenizer, folder: Path) -> tuple[Path, Path]:
    """GPT-2-style vocab.json + merges.txt for our byte-level BPE: each merge recovered as the pair the BPE
    itself forms from the token's bytes with only the lower ranks."""
    from llmscratch.tokenizer.gpt2 import gpt2_byte_to_unicode

    show = gpt2_byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(show[b] for b in token)

    ranks = tokenizer.ranks
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{text(parts[0])} {text(b''.join(parts[1:]))}")
    vocab = {text(t): r for t, r in ranks.items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def run_prepare(corpus: Path, tokenizer: str, out: Path, env: dict) -> dict:
    argv = [sys.executable, "-m", "llmscratch", "prepare", "--data", str(corpus), "--tokenizer", tokenizer,
            "--out", str(out)]
    result = measured(argv, env)
    if result["code"] != 0:
        sys.exit(f"prepare failed ({result['code']}): {result['stderr'][-2000:]}")
    meta = json.loads((out / "meta.json").read_text())
    result["tokens"] = meta["train_tokens"] + meta["val_tokens"]
    result["bytes"] = corpus.stat().st_size
    shutil.rmtree(out)
    return result


def run_hf(vocab: Path, merges: Path, corpus: Path, limit: int) -> dict:
    result = measured([sys.executable, "-c", HF_CHILD, str(vocab), str(merges), str(corpus), str(limit)])
    if result["code"] != 0:
        sys.exit(f"tokenizers failed: {result['stderr'][-2000:]}")
    result.update(json.loads(result["stdout"]))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=1000, help="size of the generated text, MB (default 1000)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write it (default: a temp folder)")
    parser.add_argument("--contender-mb", type=int, default=None,
                        help="encode only the file's first N MB with `tokenizers` (default: all of it)")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import available_cores, load_average, markdown_table

    from llmscratch.tokenizer import BPETokenizer, gpt2_files_in, load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="prepare-memory-", dir=args.dir))
    env = dict(os.environ)
    gpt2_dir = Path(env.get("LLMSCRATCH_GPT2_DIR", SHARED_GPT2))
    if gpt2_dir.is_dir() and gpt2_files_in(gpt2_dir) is not None:
        env["LLMSCRATCH_GPT2_DIR"] = str(gpt2_dir)
    else:
        gpt2_dir = None
    try:
        corpus = work / "corpus.txt"
        t = time.perf_counter()
        size = write_corpus(corpus, args.mb)
        print(f"wrote {size / 1e6:,.0f} MB to {corpus} in {time.perf_counter() - t:.1f} s", flush=True)
        with open(corpus, encoding="utf-8") as f:
            sample = f.read(1_000_000)
        t = time.perf_counter()
        BPETokenizer.train(sample, 4096, progress=False).save(work / "bpe")
        print(f"trained a 4096-token BPE on 1 MB in {time.perf_counter() - t:.1f} s", flush=True)

        baseline = measured([sys.executable, "-c", "import llmscratch.data, llmscratch.tokenizer"])
        print(f"baseline: a Python that imports llmscratch.data (and so torch) peaks at "
              f"{baseline['hwm_max'] / 1e6:.0f} MB RSS", flush=True)
        tokenizers = [("bpe-4096", str(work / "bpe"), hf_files_for(load_tokenizer(work / "bpe"), work / "hf-bpe"))]
        if gpt2_dir is not None:
            tokenizers.append(("gpt2", "gpt2", (gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")))
        rows = []
        for name, ours, (vocab, merges) in tokenizers:
            limit = size if args.contender_mb is None else args.contender_mb * 1_000_000
            for who, result in (("llmscratch prepare", run_prepare(corpus, ours, work / "out", env)),
                                ("tokenizers encode_batch_fast", run_hf(vocab, merges, corpus, limit))):
                rows.append([who, name, f"{result['bytes'] / 1e6:,.0f}", f"{result['seconds']:.1f}",
                             f"{result['bytes'] / 1e6 / result['seconds']:.1f}",
                             f"{result['tokens']:,}", f"{result['tokens'] / result['seconds'] / 1e6:.2f}M",
                             result["processes"], f"{result['rss_sum'] / 1e6:.0f}",
                             f"{result['pss_sum'] / 1e6:.0f}", f"{result['hwm_max'] / 1e6:.0f}"])
                print(f"{who} / {name}: {rows[-1][3]} s, {rows[-1][4]} MB/s", flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{size / 1e6:,.0f} MB of text | {available_cores()} cores | load avg at end {load_average()} | {when}\n")
    print(markdown_table(["run", "tokenizer", "MB", "wall s", "MB/s", "tokens", "tok/s", "processes",
                          "peak RSS sum MB", "peak PSS sum MB", "largest process peak RSS MB"], rows))
    worst = max(float(r[9]) for r in rows if r[0] == "llmscratch prepare")
    print(f"\nprepare's peak PSS (the tree's memory, shared pages once): {worst:.0f} MB "
          f"({'meets' if worst < 500 else 'MISSES'} the < 500 MB target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
