"""Verbs that use a model: `generate`, `info` (its size and costs) and `classify`."""

from __future__ import annotations

import sys
from pathlib import Path

from llmscratch.cli.base import (
    MODEL_FOLDER_HELP,
    Optional,
    PositiveInt,
    Verb,
    device_options,
    inference_options,
    sampling_options,
)
from llmscratch.errors import UserError


# --- generate ---------------------------------------------------------------------------------------------
def _generate_parser(p) -> None:
    p.add_argument("checkpoint", help=MODEL_FOLDER_HELP)
    p.add_argument("--prompt", required=True,
                   help="text to continue; for an instruction-tuned checkpoint, the request (wrapped in its prompt "
                        "style, and only the answer is printed)")
    p.add_argument("--raw", action="store_true",
                   help="never wrap --prompt in the checkpoint's saved prompt style: continue the text as is")
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as a user turn through the model's own chat template (Llama/Qwen tokenizer "
                        "folders) and stop at its end-of-turn tokens")
    p.add_argument("--system", default=None, help="with --chat: a system message before the user turn")
    p.add_argument("--max-new-tokens", type=Optional[PositiveInt], default=None,
                   help="tokens to generate, at most the model's context length (default: 100, or the context "
                        "length if shorter)")
    sampling_options(p, temperature=0.8)
    p.add_argument("--stop", type=str, action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole window every step")
    p.add_argument("--compile", action="store_true",
                   help="decode through a step torch.compile'd in this process. GPU: CUDA graphs, several times "
                        "faster per token. CPU: rarely needed, since without it generate already decodes through a "
                        "step compiled ahead of time once per machine and model shape (built in the background on "
                        "first use; LLMSCRATCH_COMPILED_STEPS=off turns that off); compiling here takes ~18 s the "
                        "first time on a machine, ~5 s once PyTorch's compile cache holds it (GPT-2 124M). Uses the "
                        "KV cache: not with --no-kv-cache")
    inference_options(p)


def cmd_generate(a) -> None:
    from llmscratch.generate import check_new_tokens, stream
    from llmscratch.prompts import strip_leading_space

    if a.compile and a.no_kv_cache:
        raise UserError("--compile compiles the KV-cached decoding step: drop --no-kv-cache, or --compile")
    model, tok = load_for_inference(a.checkpoint, a.device, a.dtype, pack=not a.no_pack)
    max_new_tokens = check_new_tokens(a.max_new_tokens, model, default=100)
    # An instruction-tuned checkpoint: wrap the request in its prompt style, stop at its end of turn, and
    # print only the answer.
    style = None if a.raw or a.chat else saved_style(a.checkpoint)
    prompt, shown, stop = a.prompt, a.prompt, list(a.stop or ())
    if a.chat:  # the model's own chat template (a Hugging Face tokenizer folder: Llama 3, Qwen3)
        chat = _chat_prompt(a, tok)
        prompt, shown, stop = chat.text, "", stop + list(chat.stop)
    elif style is not None:
        prompt, shown, stop = style.wrap(a.prompt), "", stop + list(style.stop)
    if a.compile:  # a wait of seconds before the first token: say why
        sys.stderr.write("llmscratch: compiling the decoding step (a few seconds; up to ~20 s the first time on a "
                         "machine)\n")
    pieces = stream(model, tok, prompt, max_new_tokens=max_new_tokens, temperature=a.temperature,
                    top_k=a.top_k or None, top_p=a.top_p, seed=a.seed, stop=stop,
                    use_cache=not a.no_kv_cache, compile=a.compile, compiled_ahead=True)
    if style is not None or a.chat:
        pieces = strip_leading_space(pieces)
    if a.stream:
        sys.stdout.write(shown)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(shown + "".join(pieces))


def load_for_inference(checkpoint: str, device: str = "auto", dtype: str = "auto", pack: bool = True,
                       rows: int = 1):
    """(model, tokenizer) ready to generate, from a checkpoint folder, a training run folder, or a LoRA adapter
    folder (its base and adapter merged in memory): what `generate` and `chat` run. `device`, `dtype`: the
    `--device`/`--dtype` names; `pack`: oneDNN-packed linears on a CPU (faster decoding; a no-op elsewhere);
    `rows`: the most sequences a step decodes together (a server's batch), for `--dtype auto`'s choice."""
    from llmscratch import runs
    from llmscratch.checkpoint import load
    from llmscratch.lora import load_merged
    from llmscratch.model.packed import pack_for_cpu_inference
    from llmscratch.runtime import inference_dtype, resolve_device

    device = resolve_device(device)
    load_fn = load_merged if runs.is_adapter_only(checkpoint) else load
    model, tok = load_fn(checkpoint, device=device, dtype=inference_dtype(dtype, device, rows=rows))
    if model.config.n_classes is not None:
        raise UserError(f"{checkpoint}: a classifier (labels, not text); use `llmscratch classify {checkpoint} "
                        "TEXT...`, or give a language model checkpoint")
    if pack:
        pack_for_cpu_inference(model, where_faster=True)  # only the shapes packing speeds up on this CPU
    return model, tok


def saved_style(checkpoint: str):
    """The prompt style `checkpoint` (as `load_for_inference` takes it) was fine-tuned in, or None."""
    from llmscratch import runs
    from llmscratch.prompts import load_style

    return load_style(Path(checkpoint) if runs.is_adapter_only(checkpoint) else runs.find_model_folder(checkpoint))


def _chat_prompt(a, tok):
    """`--prompt` (after `--system`, if any) as a user turn in the tokenizer's chat template, ready for the answer:
    a `ChatPrompt` whose stop strings are the tokenizer's stop ids (<|eot_id|>, <|im_end|>, ...)."""
    from llmscratch.prompts import chat_format

    template = chat_format(tok, None)
    if template.kind != "template":
        raise UserError(f"{a.checkpoint}: --chat needs a tokenizer with a chat template (a Llama/Qwen model "
                        "converted from its Hugging Face folder); use --prompt alone")
    messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
        {"role": "user", "content": a.prompt}]
    return template.render(messages)


GENERATE = Verb("Generate text from a checkpoint folder.", _generate_parser, cmd_generate)


# --- info -------------------------------------------------------------------------------------------------
def _info_parser(p) -> None:
    from llmscratch.config import PRESETS

    p.add_argument("target", help=f"checkpoint folder or preset ({', '.join(PRESETS)})")
    p.add_argument("--batch-size", type=PositiveInt, default=8, help="batch size for the activation estimate")


def cmd_info(a) -> None:
    from llmscratch.config import PRESETS, ModelConfig
    from llmscratch.model.memory import attention_variant, format_bytes, kv_bytes_per_token, kv_cache_bytes
    from llmscratch.model.transformer import flops_per_token
    from llmscratch.runs import CONFIG, find_model_folder

    if a.target in PRESETS and not Path(a.target).exists():
        cfg, source = ModelConfig.from_preset(a.target), "preset"
    else:
        if not Path(a.target).exists():
            raise UserError(f"{a.target}: neither a checkpoint folder nor a preset ({', '.join(PRESETS)})")
        folder = find_model_folder(a.target)
        cfg, source = ModelConfig.load(folder / CONFIG), str(folder)
    import torch

    from llmscratch.model import GPT

    with torch.device("meta"):
        m = GPT(cfg)
    n, n_body = m.num_params(), m.num_params(exclude_embeddings=True)
    T, B = cfg.context_length, a.batch_size
    # Activations saved for backward, per token per layer, roughly 34·d bytes in 16-bit (Korthikanti et al.
    # 2022, eq. 1, no recomputation, without its 5·h·T term for the attention-score matrices: SDPA's fused
    # kernels never store them); reported for bf16 autocast.
    act = B * T * cfg.n_layers * 34 * cfg.d_model
    # Sliding-window layers stop growing past their window: then the average per token is smaller.
    kv_full = kv_cache_bytes(cfg, T)
    kv_average = f" (average {format_bytes(kv_full / T)}/token)" if kv_full != T * kv_bytes_per_token(cfg) else ""
    gib = 1024 ** 3
    rows = [
        ("config", f"{cfg.name} ({source})"),
        ("shape", f"{cfg.n_layers} layers × d_model {cfg.d_model}, {cfg.n_heads} heads "
                  f"({cfg.n_kv_heads} kv), d_ff {cfg.d_ff}, context {T}, vocab {cfg.vocab_size}"),
        ("parameters", f"{n:,} ({n / 1e6:.1f}M); without embeddings {n_body:,}"),
        ("FLOPs/token", f"forward {flops_per_token(cfg, T, False) / 1e9:.3f} GFLOP, "
                        f"training {flops_per_token(cfg, T, True) / 1e9:.3f} GFLOP (at context {T})"),
        ("weights", f"fp32 {n * 4 / gib:.2f} GiB, bf16 {n * 2 / gib:.2f} GiB"),
        ("training", f"≈{(n * 16 + act) / gib:.2f} GiB at batch {B} (fp32 weights+grads+AdamW "
                     f"{n * 16 / gib:.2f} GiB, activations ≈{act / gib:.2f} GiB)"),
        ("KV cache", f"{attention_variant(cfg)}: {format_bytes(kv_bytes_per_token(cfg))}/token in bf16, "
                     f"{format_bytes(kv_full)} per sequence at the full context{kv_average}"),
    ]
    if cfg.n_experts:  # a token runs through only n_experts_per_token experts of each layer
        active = m.num_active_params()
        rows.insert(next(i for i, (k, _) in enumerate(rows) if k == "parameters") + 1, (
            "experts", f"{cfg.n_experts} per layer, {cfg.n_experts_per_token} per token: total "
                       + ", active ".join(f"{x:,} ({x / 1e9:.2f}B)" if x >= 1e9 else f"{x:,} ({x / 1e6:.2f}M)"
                                          for x in (n, active)) + " per token"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


INFO = Verb("Parameters, FLOPs per token and memory estimates of a checkpoint or preset.", _info_parser, cmd_info)


# --- classify ---------------------------------------------------------------------------------------------
def _classify_parser(p) -> None:
    p.add_argument("checkpoint", help="classifier folder written by `llmscratch finetune classify`")
    p.add_argument("texts", nargs="+", help="one or more texts to classify (quote each)")
    device_options(p)


def cmd_classify(a) -> None:
    from llmscratch.finetune.classify import Classifier
    from llmscratch.runtime import resolve_device

    clf = Classifier.load(a.checkpoint, device=resolve_device(a.device))
    for text, (label, prob) in zip(a.texts, clf.predict(a.texts)):
        print(f"{label}\t{prob:.3f}\t{text}")


CLASSIFY = Verb("Classify texts with a fine-tuned classifier: prints label, probability and text per line.",
                _classify_parser, cmd_classify)
