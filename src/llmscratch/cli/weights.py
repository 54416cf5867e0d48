"""Verbs that move weights between formats: `download` (pretrained models), `convert` (Hugging Face and OpenAI
folders, both ways) and `lora` (adapters merged, or exported for Hugging Face PEFT)."""

from __future__ import annotations

from llmscratch.cli.base import Group, Optional, PositiveInt, Verb, overwrite_option, progress_option


# --- download ---------------------------------------------------------------------------------------------
def _download_parser(p) -> None:
    from llmscratch.weights.hub import MODELS

    p.add_argument("model", help=" | ".join(MODELS))
    p.add_argument("--out", required=True, help="checkpoint folder to create (new or empty)")
    p.add_argument("--source", default="hf",
                   help="hf: the hub's model.safetensors (default) | openai: OpenAI's TensorFlow checkpoint")
    p.add_argument("--endpoint", default=None,
                   help="server to download from instead (a mirror; default: $HF_ENDPOINT, else the official one)")
    p.add_argument("--dtype", default="fp32",
                   help="fp32 | bf16 | fp16: dtype of the saved weights (Llama/Qwen are released in bf16)")
    overwrite_option(p)
    progress_option(p, "no progress bars")


def cmd_download(a) -> None:
    from llmscratch.weights.hub import download_pretrained

    model = download_pretrained(a.model, a.out, a.source, a.endpoint, a.dtype, progress=not a.no_progress,
                                overwrite=a.overwrite)
    print(f"downloaded {a.model} ({model.num_params() / 1e6:.1f}M parameters) to {a.out}; try "
          f"`llmscratch generate {a.out} --prompt \"Hello, I'm a language model,\"`")


DOWNLOAD = Verb("Download a pretrained model — OpenAI's GPT-2 (from the Hugging Face hub, or OpenAI's own release), "
                "Llama 3.2, Qwen3 — into the cache (resumable, size/sha256-checked) and convert it into a checkpoint "
                "folder. Environment: HF_ENDPOINT (a hub mirror), HF_TOKEN (sent as a bearer token; Llama is gated), "
                "HF_HUB_OFFLINE=1 (cache only).", _download_parser, cmd_download)


# --- convert from-hf | from-openai | to-hf ----------------------------------------------------------------
def _convert_from(fmt: str, source: str, source_help: str, out_help: str, tokenizer_files: str,
                  description: str, tokenizer_default: str | None = None,
                  options: dict[str, dict] | None = None) -> Verb:
    """The verb `convert from-FMT`: the folder `source` (a positional option) → our checkpoint folder `out`, by
    `llmscratch.weights.convert.from_FMT`; without `--tokenizer`, the folder's own `tokenizer_files` (or what
    `tokenizer_default` says). `options`: the format's own flags (flag → add_argument keywords), handed on to
    from_FMT as keyword arguments under their names (`--heads` → heads)."""
    options = options or {}
    tokenizer_default = tokenizer_default or f"the folder's {tokenizer_files}"

    def parser(p) -> None:
        p.add_argument(source, help=source_help)
        p.add_argument("out", help=out_help)
        p.add_argument("--tokenizer", default=None, help=f"tokenizer folder or `gpt2` (default: {tokenizer_default})")
        p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16: dtype of the saved weights")
        for flag, kwargs in options.items():
            p.add_argument(flag, **kwargs)
        overwrite_option(p, "OUT folder")

    def run(a) -> None:
        from llmscratch.weights import convert

        folder = getattr(a, source)
        extra = {name: getattr(a, name) for name in (f.lstrip("-").replace("-", "_") for f in options)}
        model = getattr(convert, f"from_{fmt}")(folder, a.out, a.tokenizer, a.dtype, overwrite=a.overwrite,
                                                **extra)
        print(f"converted {folder} ({model.num_params() / 1e6:.1f}M parameters) to {a.out}")

    return Verb(description, parser, run)


def _convert_to_hf_parser(p) -> None:
    p.add_argument("checkpoint", help="our checkpoint folder")
    p.add_argument("out", help="Hugging Face folder to write (new or empty)")
    overwrite_option(p, "OUT folder")


def cmd_convert_to_hf(a) -> None:
    from llmscratch.weights.convert import to_hf

    # what was written, and the transformers class that loads it
    note = to_hf(a.checkpoint, a.out, overwrite=a.overwrite)
    print(f"wrote {a.out}: {note}")


CONVERT = Group("Convert weights between formats.", "convert GPT-2 (Hugging Face, OpenAI, the book's), Llama, "
                "Qwen3, Qwen3-MoE and Gemma 3 weights to our checkpoints and back", {
    "from-hf": _convert_from("hf", "hf_dir", "Hugging Face model folder with config.json", "checkpoint folder to write",
                             "vocab.json + merges.txt",
                             "A Hugging Face GPT-2, Llama, Qwen3, Qwen3-MoE or Gemma 3 (text) folder "
                             "(model.safetensors, a sharded index, or "
                             "pytorch_model.bin read with weights_only) → our checkpoint folder."),
    "from-openai": _convert_from("openai", "tf_dir", "folder with hparams.json and model.ckpt.*",
                                 "checkpoint folder to write (new or empty)", "encoder.json + vocab.bpe",
                                 "A folder of OpenAI's original GPT-2 release (hparams.json, checkpoint, "
                                 "model.ckpt.index, model.ckpt.data-*, encoder.json, vocab.bpe) → our checkpoint "
                                 "folder; no TensorFlow needed."),
    "from-book": _convert_from("book", "source", "the .pth file: torch.save(model.state_dict(), ...) of the book's "
                               "GPTModel, or chapter 5's dict with model_state_dict", "checkpoint folder to write "
                               "(new or empty)", "", "The book's own GPT-2 (`GPTModel`, chapter 4, saved with "
                               "torch.save in chapter 5) → our checkpoint folder; read with weights_only=True, so "
                               "a file that pickles other Python objects is refused, never run.",
                               tokenizer_default="gpt2, the tokenizer the book uses",
                               options={"--heads": dict(type=Optional[PositiveInt], default=None,
                                                        help="n_heads of the model (default: the book's preset "
                                                             "for its emb_dim: 768→12, 1024→16, 1280→20, 1600→25)"),
                                        "--name": dict(default=None, help="name recorded in config.json "
                                                                          "(default: book-gpt)")}),
    "from-sharded": _convert_from("sharded", "step_dir", "a checkpoints/step-N folder of a run trained with "
                                  "--train.strategy fsdp", "checkpoint folder to write (new or empty)",
                                  "tokenizer", "A step checkpoint of an FSDP2 run (its weights and optimizer state "
                                  "in sharded/, one file per process) → an ordinary checkpoint folder with one "
                                  "model.safetensors. (generate, chat and finetune also read such a step folder "
                                  "directly.)"),
    "to-hf": Verb("Our checkpoint folder → a folder transformers.AutoModelForCausalLM loads (as GPT2LMHeadModel, "
                  "or LlamaForCausalLM / Qwen3ForCausalLM / Qwen3MoeForCausalLM / Gemma3ForCausalLM for those "
                  "configurations), with the tokenizer for AutoTokenizer: such a model's own tokenizer files, or "
                  "vocab.json + merges.txt for a "
                  "byte-level BPE with GPT-2's regex.", _convert_to_hf_parser, cmd_convert_to_hf),
})


# --- lora merge | export-peft -----------------------------------------------------------------------------
def _adapter_options(p, out_help: str) -> None:
    """The positional options of the `lora` verbs: the adapter folder they read, and the folder `out` they write."""
    p.add_argument("adapter", help="adapter folder (adapter.safetensors + adapter_config.json)")
    p.add_argument("out", help=out_help)


def _lora_merge_parser(p) -> None:
    _adapter_options(p, "checkpoint folder to write (new or empty)")
    p.add_argument("--base", default=None,
                   help="base checkpoint folder (default: the path recorded in adapter_config.json); its weights "
                        "must be the ones the adapter was trained on (sha256 checked)")
    overwrite_option(p, "OUT folder")


def cmd_lora_merge(a) -> None:
    from llmscratch.lora import merge_adapter_folder

    merge_adapter_folder(a.adapter, a.out, base=a.base, overwrite=a.overwrite)
    print(f"merged {a.adapter} into its base; full checkpoint in {a.out}")


def _lora_export_peft_parser(p) -> None:
    _adapter_options(p, "folder to write (new or empty)")
    p.add_argument("--base-hf", default=None,
                   help="the Hugging Face export of the base, recorded as base_model_name_or_path (default: the "
                        "base checkpoint's path)")
    overwrite_option(p, "OUT folder")


def cmd_lora_export_peft(a) -> None:
    from llmscratch.lora import export_peft
    from llmscratch.runs import ADAPTER_CONFIG, PEFT_WEIGHTS

    export_peft(a.adapter, a.out, base_hf=a.base_hf, overwrite=a.overwrite)
    print(f"wrote {a.out}/{ADAPTER_CONFIG} and {PEFT_WEIGHTS}; load with "
          "peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), "
          f"{str(a.out)!r}) where BASE_HF is `llmscratch convert to-hf` of the base")


LORA = Group("LoRA adapters written by `finetune ... --lora-rank R`.", "merge a LoRA adapter into a full checkpoint, "
             "or export it for Hugging Face PEFT", {
    "merge": Verb("Base checkpoint + adapter → a full checkpoint folder (weights merged: W + alpha/r·BA), with the "
                  "adapter's prompt style and labels; generate, classify, eval and convert use it like any other.",
                  _lora_merge_parser, cmd_lora_merge),
    "export-peft": Verb("An adapter → Hugging Face PEFT's adapter_config.json + adapter_model.safetensors, for the "
                        "base exported by `llmscratch convert to-hf` (GPT-2, Llama, Qwen3): "
                        "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), OUT).",
                        _lora_export_peft_parser, cmd_lora_export_peft),
})
