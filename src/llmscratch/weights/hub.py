"""`llmscratch download`: OpenAI's GPT-2 in four sizes, fetched from the Hugging Face hub (or OpenAI's own
release) into the cache, then converted into our checkpoint folder.

Files go to `cache_dir()/hf/<repo>/` (or `cache_dir()/openai/gpt-2/<size>/`) through the one downloader,
`llmscratch.data.corpora.download`: resumable `.part` files, a progress bar, and size/sha256 checks against
what the server states (the hub sends each LFS file's sha256 and size on its redirect to the CDN). A file in
the cache under its real name has passed those checks, so a second run (or one with `HF_HUB_OFFLINE=1`)
converts without the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmscratch.errors import UserError


@dataclass(frozen=True)
class PretrainedGPT2:
    name: str  # what users type
    hf_repo: str  # Hugging Face hub repository
    openai_size: str  # folder name in OpenAI's release


MODELS: dict[str, PretrainedGPT2] = {m.name: m for m in (
    PretrainedGPT2("gpt2-124m", "openai-community/gpt2", "124M"),
    PretrainedGPT2("gpt2-355m", "openai-community/gpt2-medium", "355M"),
    PretrainedGPT2("gpt2-774m", "openai-community/gpt2-large", "774M"),
    PretrainedGPT2("gpt2-1558m", "openai-community/gpt2-xl", "1558M"),
)}
SOURCES = ("hf", "openai")
HF_ENDPOINT = "https://huggingface.co"
OPENAI_ENDPOINT = "https://openaipublic.blob.core.windows.net/gpt-2/models"
# Small files first: without network the first request fails before anything large is attempted.
HF_FILES = ("config.json", "vocab.json", "merges.txt", "model.safetensors")
OPENAI_FILES = ("hparams.json", "encoder.json", "vocab.bpe", "checkpoint", "model.ckpt.index",
                "model.ckpt.data-00000-of-00001")  # model.ckpt.meta (the TF graph) is not needed
CONNECT_TIMEOUT = 5.0  # seconds: a machine without network should hear so at once
READ_TIMEOUT = 60.0

LOCAL_HINT = ("to use files you already have, run `llmscratch convert from-hf DIR OUT` (a Hugging Face folder) "
              "or `llmscratch convert from-openai DIR OUT` (OpenAI's TensorFlow files)")


def model_info(name: str) -> PretrainedGPT2:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def offline() -> bool:
    """True when HF_HUB_OFFLINE asks for no network (huggingface_hub's convention: 1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_folder(name: str, source: str = "hf") -> Path:
    from llmscratch.data.corpora import cache_dir

    m = model_info(name)
    return cache_dir() / "hf" / m.hf_repo if source == "hf" else cache_dir() / "openai" / "gpt-2" / m.openai_size


def fetch(name: str, source: str = "hf", endpoint: str | None = None, progress: bool = True) -> Path:
    """The cache folder holding all of `name`'s files from `source`, downloading what is missing.

    `endpoint` replaces the server (a mirror); for the hub it defaults to $HF_ENDPOINT, then huggingface.co.
    $HF_TOKEN, when set, is sent to the hub as a bearer token. With HF_HUB_OFFLINE=1 only the cache is used.
    """
    from llmscratch.data.corpora import download

    m = model_info(name)
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    folder = cache_folder(name, source)
    files = HF_FILES if source == "hf" else OPENAI_FILES
    missing = [f for f in files if not (folder / f).is_file()]
    if not missing:
        return folder
    if offline():
        raise UserError(f"{name} is not in the cache ({folder} lacks {missing[0]}) and HF_HUB_OFFLINE=1 forbids "
                        f"downloading; {LOCAL_HINT}")
    if source == "hf":
        base = (endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
        urls = {f: f"{base}/{m.hf_repo}/resolve/main/{f}" for f in missing}
        token = os.environ.get("HF_TOKEN") or None
    else:
        base = (endpoint or OPENAI_ENDPOINT).rstrip("/")
        urls = {f: f"{base}/{m.openai_size}/{f}" for f in missing}
        token = None
    for file, url in urls.items():
        download(url, folder / file, None, name=f"{name} {file}", timeout=READ_TIMEOUT,
                 connect_timeout=CONNECT_TIMEOUT, progress=progress, token=token, server_hash=True,
                 hint=LOCAL_HINT)
    return folder


def download_pretrained(name: str, out: str | Path, source: str = "hf", endpoint: str | None = None,
                        dtype: str = "fp32", progress: bool = True):
    """Fetch `name` (see `fetch`) and convert it into our checkpoint folder `out`; returns the model."""
    from llmscratch.weights.convert import check_new_folder, from_hf, from_openai

    model_info(name)
    check_new_folder(out)  # before a multi-GB download, not after
    folder = fetch(name, source, endpoint, progress)
    convert = from_hf if source == "hf" else from_openai
    return convert(folder, out, dtype=dtype, name=name)
