"""Whole-folder conversions behind `llmscratch convert` and `llmscratch download`: another format's folder →
our checkpoint folder (weights + tokenizer), and ours → a Hugging Face folder.

Every output folder is built beside its destination under a temporary name and renamed into place when
complete, so a failure (bad input, full disk, Ctrl-C) leaves nothing at the destination.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmscratch.errors import UserError
from llmscratch.runs import HF_CONFIG, TOKENIZER, check_out_folder, write_folder


def _tokenizer(folder: Path, override: str | None, source: str):
    """The tokenizer for a converted model: `override` (a tokenizer folder or "gpt2"), else GPT-2's two BPE
    files found in `folder` under OpenAI's or Hugging Face's names."""
    from llmscratch.tokenizer import gpt2_tokenizer, load_tokenizer
    from llmscratch.tokenizer.gpt2 import gpt2_files_in

    if override:
        return load_tokenizer(override)
    if gpt2_files_in(folder) is not None:
        return gpt2_tokenizer(folder)
    raise UserError(f"{folder}: no {source}; pass --tokenizer gpt2 or a tokenizer folder")


def _save_converted(out: Path, loaded, tokenizer, source: Path, name: str | None, overwrite: bool = False):
    """Write a converted model — `loaded`, a loader's (model, its config) — with `tokenizer` into the new folder
    `out` (or over its files of the same names, with `overwrite`); returns the model."""
    from llmscratch.checkpoint import save_model

    model = loaded[0]
    if name:
        model.config.name = name
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}; "
                        "pass the matching --tokenizer")
    write_folder(out, lambda tmp: save_model(tmp, model, tokenizer, hyperparameters={"converted_from": str(source)}),
                 overwrite, inputs=(source,))
    return model


def _dtype(name: str) -> torch.dtype:
    from llmscratch.runtime import inference_dtype

    return inference_dtype(name, torch.device("cpu"))


def _hf_model_type(hf_dir: Path) -> str | None:
    import json

    try:
        return json.loads((hf_dir / HF_CONFIG).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # the loader reports the missing or broken config.json


def from_hf(hf_dir: str | Path, out: str | Path, tokenizer: str | None = None, dtype: str = "fp32",
            name: str | None = None, overwrite: bool = False):
    """A Hugging Face GPT-2, Llama, Qwen3, Qwen3-MoE or Gemma 3 folder → our checkpoint folder `out` (the model
    config named `name` if given); returns the model."""
    from llmscratch.tokenizer import HFTokenizer, load_tokenizer
    from llmscratch.weights.hf_gemma3 import MODEL_TYPE as GEMMA3
    from llmscratch.weights.hf_gemma3 import load_hf_gemma3
    from llmscratch.weights.hf_gpt2 import load_hf_gpt2
    from llmscratch.weights.hf_llama import FAMILIES, load_hf_llama

    hf_dir, out = Path(hf_dir), check_out_folder(out, overwrite, inputs=(hf_dir, tokenizer))
    if (model_type := _hf_model_type(hf_dir)) in FAMILIES or model_type == GEMMA3:
        if tokenizer:
            tok = load_tokenizer(tokenizer)
        elif (hf_dir / TOKENIZER).is_file():  # the model's own tokenizer and chat template
            tok = HFTokenizer(hf_dir)
        elif any((hf_dir / f).is_file() for f in ("tokenizer.model", "original/tokenizer.model")):
            from llmscratch.tokenizer.llama3 import llama3_tokenizer

            tok = llama3_tokenizer(hf_dir)  # Meta's tiktoken-format file (no chat template in it)
        else:
            raise UserError(f"{hf_dir}: no {TOKENIZER} or tokenizer.model; pass --tokenizer (a tokenizer folder)")
        load = load_hf_gemma3 if model_type == GEMMA3 else load_hf_llama
        return _save_converted(out, load(hf_dir, dtype=_dtype(dtype)), tok, hf_dir, name, overwrite)
    tok = _tokenizer(hf_dir, tokenizer, "vocab.json + merges.txt")
    return _save_converted(out, load_hf_gpt2(hf_dir, dtype=_dtype(dtype)), tok, hf_dir, name, overwrite)


def from_openai(tf_dir: str | Path, out: str | Path, tokenizer: str | None = None, dtype: str = "fp32",
                name: str | None = None, overwrite: bool = False):
    """A folder of OpenAI's GPT-2 release (TensorFlow checkpoint) → our checkpoint folder `out`."""
    from llmscratch.weights.openai_tf import load_openai_gpt2

    tf_dir, out = Path(tf_dir), check_out_folder(out, overwrite, inputs=(tf_dir, tokenizer))
    tok = _tokenizer(tf_dir, tokenizer, "encoder.json + vocab.bpe")
    return _save_converted(out, load_openai_gpt2(tf_dir, dtype=_dtype(dtype)), tok, tf_dir, name, overwrite)


def from_book(source: str | Path, out: str | Path, tokenizer: str | None = None, dtype: str = "fp32",
              name: str | None = None, overwrite: bool = False, heads: int | None = None):
    """A `.pth` file of the book's `GPTModel` (its state dict, or chapter 5's dict with "model_state_dict") →
    our checkpoint folder `out`, with GPT-2's tokenizer unless `tokenizer` names another; `heads`: its n_heads
    when the width is none of the book's presets. Returns the model."""
    from llmscratch.tokenizer import load_tokenizer
    from llmscratch.weights.book_gpt import load_book_gpt

    source, out = Path(source), check_out_folder(out, overwrite, inputs=(source, tokenizer))
    tok = load_tokenizer(tokenizer or "gpt2")  # the book trains and samples with tiktoken's GPT-2 encoding
    return _save_converted(out, load_book_gpt(source, dtype=_dtype(dtype), heads=heads), tok, source, name,
                           overwrite)


def from_sharded(step_dir: str | Path, out: str | Path, tokenizer: str | None = None, dtype: str = "fp32",
                 name: str | None = None, overwrite: bool = False):
    """A step folder of a run trained with FSDP2 (its weights in `sharded/`, one file per process) → an ordinary
    checkpoint folder `out` with one model.safetensors, read in this one process; returns the model."""
    from llmscratch.checkpoint import find_model_folder, load_model
    from llmscratch.runs import SHARDED
    from llmscratch.tokenizer import load_tokenizer

    step_dir, out = Path(step_dir), check_out_folder(out, overwrite, inputs=(step_dir, tokenizer))
    folder = find_model_folder(step_dir)
    if not (folder / SHARDED).is_dir():
        raise UserError(f"{folder}: no {SHARDED}/ folder; this checkpoint is not sharded (it is already an "
                        "ordinary checkpoint folder)")
    model = load_model(folder, dtype=_dtype(dtype))
    tok = load_tokenizer(tokenizer or folder)
    return _save_converted(out, (model, model.config), tok, step_dir, name, overwrite)


def to_hf(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> str:
    """Our checkpoint folder → a Hugging Face folder of GPT2LMHeadModel, or of LlamaForCausalLM / Qwen3ForCausalLM /
    Qwen3MoeForCausalLM / Gemma3ForCausalLM for those configurations (weights, config, and the tokenizer when the
    export can carry it). Returns a note for the user: what was written, and the transformers class that loads it."""
    import json

    from llmscratch.checkpoint import find_model_folder, load_model
    from llmscratch.runs import HF_CONFIG
    from llmscratch.tokenizer import HFTokenizer, load_tokenizer
    from llmscratch.tokenizer.storage import TOKENIZER_FILE
    from llmscratch.weights.hf_gemma3 import export_hf_gemma3, is_gemma3
    from llmscratch.weights.hf_gpt2 import export_hf_gpt2
    from llmscratch.weights.hf_llama import export_hf_llama
    from llmscratch.weights.hf_tokenizer import gpt2_vocab_and_merges

    out = check_out_folder(out, overwrite, inputs=(checkpoint,))
    folder = find_model_folder(checkpoint)
    model = load_model(folder)
    if model.config.position == "rope":  # a Llama/Qwen3 configuration
        tok = load_tokenizer(folder) if (folder / TOKENIZER_FILE).is_file() else None
        hf_tok = isinstance(tok, HFTokenizer)

        def write(tmp: Path) -> None:
            (export_hf_gemma3 if is_gemma3(model.config) else export_hf_llama)(model, tmp)
            if hf_tok:
                tok.save(tmp)

        write_folder(out, write, overwrite, inputs=(checkpoint,))
        note = ("weights and the model's own tokenizer files" if hf_tok else
                "weights only (a Llama/Qwen export carries a Hugging Face tokenizer.json only)")
    else:
        tok, note = None, "weights only (the checkpoint has no tokenizer)"
        if (folder / TOKENIZER_FILE).is_file():
            tok = load_tokenizer(folder)
            try:
                gpt2_vocab_and_merges(tok)  # checked before anything is written
                note = "weights and tokenizer (vocab.json + merges.txt)"
            except UserError as exc:
                tok, note = None, f"weights only — {exc}"
        write_folder(out, lambda tmp: export_hf_gpt2(model, tmp, tokenizer=tok), overwrite, inputs=(checkpoint,))
    architecture = json.loads((out / HF_CONFIG).read_text())["architectures"][0]  # the class the export names
    return f"{note}; transformers.{architecture}.from_pretrained (or AutoModelForCausalLM) loads it"
