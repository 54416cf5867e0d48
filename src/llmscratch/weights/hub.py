"""`llmscratch download`: OpenAI's GPT-2 in four sizes, Llama 3.2 (1B, 3B; base and instruct) and Qwen3 (0.6B,
1.7B), fetched from the Hugging Face hub (GPT-2 also from OpenAI's own release) into the cache, then converted
into our checkpoint folder.

Files go to `cache_dir()/hf/<repo>/` (or `cache_dir()/openai/gpt-2/<size>/`) through the one downloader,
`llmscratch.download.download`: resumable `.part` files, a progress bar, and size/sha256 checks against
what the server states (the hub sends each LFS file's sha256 and size on its redirect to the CDN). A file in
the cache under its real name has passed those checks, so a second run (or one with `HF_HUB_OFFLINE=1`)
converts without the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmscratch.errors import UserError
from llmscratch.runs import HF_CONFIG, HF_WEIGHTS, HF_WEIGHTS_INDEX, TOKENIZER, check_out_folder


@dataclass(frozen=True)
class Pretrained:
    name: str  # what users type
    hf_repo: str  # Hugging Face hub repository
    family: str = "gpt2"  # gpt2 | llama | qwen3: which files to fetch and which converter reads them
    openai_size: str | None = None  # folder name in OpenAI's release (GPT-2 only)
    sharded: bool = False  # weights in shards listed by model.safetensors.index.json
    gated: bool = False  # the hub wants an accepted license and $HF_TOKEN (Meta's Llama)


MODELS: dict[str, Pretrained] = {m.name: m for m in (
    Pretrained("gpt2-124m", "openai-community/gpt2", openai_size="124M"),
    Pretrained("gpt2-355m", "openai-community/gpt2-medium", openai_size="355M"),
    Pretrained("gpt2-774m", "openai-community/gpt2-large", openai_size="774M"),
    Pretrained("gpt2-1558m", "openai-community/gpt2-xl", openai_size="1558M"),
    Pretrained("llama3.2-1b", "meta-llama/Llama-3.2-1B", "llama", gated=True),
    Pretrained("llama3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct", "llama", gated=True),
    Pretrained("llama3.2-3b", "meta-llama/Llama-3.2-3B", "llama", sharded=True, gated=True),
    Pretrained("llama3.2-3b-instruct", "meta-llama/Llama-3.2-3B-Instruct", "llama", sharded=True, gated=True),
    Pretrained("qwen3-0.6b", "Qwen/Qwen3-0.6B", "qwen3"),
    Pretrained("qwen3-1.7b", "Qwen/Qwen3-1.7B", "qwen3", sharded=True),
)}
SOURCES = ("hf", "openai")
HF_ENDPOINT = "https://huggingface.co"
OPENAI_ENDPOINT = "https://openaipublic.blob.core.windows.net/gpt-2/models"
# Small files first: without network the first request fails before anything large is attempted.
HF_FILES = (HF_CONFIG, "vocab.json", "merges.txt", HF_WEIGHTS)
HF_CHAT_FILES = (HF_CONFIG, "generation_config.json", "tokenizer_config.json", TOKENIZER)  # Llama, Qwen
OPENAI_FILES = ("hparams.json", "encoder.json", "vocab.bpe", "checkpoint", "model.ckpt.index",
                "model.ckpt.data-00000-of-00001")  # model.ckpt.meta (the TF graph) is not needed
CONNECT_TIMEOUT = 5.0  # seconds: a machine without network should hear so at once
READ_TIMEOUT = 60.0

LOCAL_HINT = ("to use files you already have, run `llmscratch convert from-hf DIR OUT` (a Hugging Face folder) "
              "or `llmscratch convert from-openai DIR OUT` (OpenAI's TensorFlow files)")


def model_info(name: str) -> Pretrained:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network (huggingface_hub's convention: 1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_folder(name: str, source: str = "hf") -> Path:
    from llmscratch.download import cache_dir

    m = model_info(name)
    return cache_dir() / "hf" / m.hf_repo if source == "hf" else cache_dir() / "openai" / "gpt-2" / m.openai_size


def _files(m: Pretrained, folder: Path, source: str) -> list[str]:
    """The files of `m` to fetch, in order (the shards once the index is in the cache)."""
    if source == "openai":
        return list(OPENAI_FILES)
    if m.family == "gpt2":
        return list(HF_FILES)
    if not m.sharded:
        return [*HF_CHAT_FILES, HF_WEIGHTS]
    from llmscratch.weights.hf_gpt2 import shard_names  # torch, which the conversion after the download needs

    index = folder / HF_WEIGHTS_INDEX
    # shard_names keeps every name inside the folder: each one is downloaded to `folder / name`
    return [*HF_CHAT_FILES, HF_WEIGHTS_INDEX, *(shard_names(index) if index.is_file() else [])]


def fetch(name: str, source: str = "hf", endpoint: str | None = None, progress: bool = True) -> Path:
    """The cache folder holding all of `name`'s files from `source`, downloading what is missing.

    `endpoint` replaces the server (a mirror); for the hub it defaults to $HF_ENDPOINT, then huggingface.co.
    $HF_TOKEN, when set, is sent to the hub as a bearer token. With HF_HUB_OFFLINE=1 only the cache is used.
    """
    import urllib.parse

    from llmscratch.download import download

    m = model_info(name)
    if source not in SOURCES:
        raise UserError(f"--source {source}: unknown source; choose one of {', '.join(SOURCES)}")
    if source == "openai" and m.openai_size is None:
        raise UserError(f"--source openai has GPT-2 only; {name} comes from the Hugging Face hub (--source hf)")
    folder = cache_folder(name, source)
    missing = [f for f in _files(m, folder, source) if not (folder / f).is_file()]
    if not missing:
        return folder
    if offline():
        raise UserError(f"{name} is not in the cache ({folder} lacks {missing[0]}) and HF_HUB_OFFLINE=1 forbids "
                        f"downloading; {LOCAL_HINT}")
    if source == "hf":
        base = (endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
        urls = {f: f"{base}/{m.hf_repo}/resolve/main/{urllib.parse.quote(f)}" for f in missing}
        token = os.environ.get("HF_TOKEN") or None
    else:
        base = (endpoint or OPENAI_ENDPOINT).rstrip("/")
        urls = {f: f"{base}/{m.openai_size}/{f}" for f in missing}
        token = None
    hint = LOCAL_HINT
    if m.gated:
        hint = (f"{m.hf_repo} is gated: accept its license on the hub, set HF_TOKEN to an access token, and retry; "
                + LOCAL_HINT)
    for file, url in urls.items():
        download(url, folder / file, None, name=f"{name} {file}", timeout=READ_TIMEOUT,
                 connect_timeout=CONNECT_TIMEOUT, progress=progress, token=token, server_hash=True, hint=hint)
    if m.sharded and source == "hf" and any(not (folder / f).is_file() for f in _files(m, folder, source)):
        return fetch(name, source, endpoint, progress)  # the index arrived: now its shards
    return folder


def download_pretrained(name: str, out: str | Path, source: str = "hf", endpoint: str | None = None,
                        dtype: str = "fp32", progress: bool = True, overwrite: bool = False):
    """Fetch `name` (see `fetch`) and convert it into our checkpoint folder `out` (new or empty; with `overwrite`
    its files of the same names are replaced); returns the model."""
    import torch

    from llmscratch.runtime import inference_dtype
    from llmscratch.weights.convert import from_hf, from_openai

    model_info(name)
    if source not in SOURCES:
        raise UserError(f"--source {source}: unknown source; choose one of {', '.join(SOURCES)}")
    if dtype == "auto":
        raise UserError("--dtype auto: the saved weights need a fixed dtype; use fp32, bf16 or fp16")
    inference_dtype(dtype, torch.device("cpu"))  # an unknown --dtype: refused now, not after the download
    check_out_folder(out, overwrite)  # before a multi-GB download, not after
    folder = fetch(name, source, endpoint, progress)
    convert = from_hf if source == "hf" else from_openai
    return convert(folder, out, dtype=dtype, name=name, overwrite=overwrite)
