"""The `llmscratch` command line: one verb per pipeline stage.

Every verb takes `--config FILE.yaml` (keys = option names with underscores) and, where a run has training
settings, dotted overrides such as `--train.lr 3e-4`. User mistakes end as one line on stderr and exit 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llmscratch.errors import UserError

CORPUS_HELP = "a named corpus (pydocs, the-verdict, tinyshakespeare), a text file, a folder or a glob"


def _parser_class():
    from jsonargparse import ArgumentParser

    class Parser(ArgumentParser):
        """Parse errors as one line on stderr and exit code 2, like every other user mistake."""

        def error(self, message, *args, **kwargs):
            # jsonargparse's messages span lines ('Parser key "x":' then the reason): fold them into one.
            text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
            text = text[:400] or "invalid arguments"
            prog = self.prog.replace(" [options]", "")
            sys.stderr.write(f"llmscratch: error: {text} (see `{prog} --help`)\n")
            sys.exit(2)

    return Parser


def build_parser(argv: list[str] | None = None):
    """The whole command line. Building it imports no PyTorch (~2 s on the development VM), so `--help` and
    mistakes answer at once — except the fine-tuning verbs, whose defaults live in modules that need it: their
    options are added only when `argv` names `finetune` (or is None, for the full parser)."""
    from jsonargparse import ActionConfigFile, set_parsing_settings

    from llmscratch.config import PRESETS
    from llmscratch.train.config import TrainConfig

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # TrainConfig field docstrings → --help
    P = _parser_class()
    root = P(prog="llmscratch", description="Build, train and sample a GPT from scratch. "
             "Start with `llmscratch quickstart`.")
    root.add_argument("--version", action="version", version=_version())
    verbs = root.add_subcommands(dest="verb", required=True)

    def verb(name: str, help: str, parent=verbs, prog=None):
        p = P(prog=prog or f"llmscratch {name}", description=help)
        p.add_argument("--config", action=ActionConfigFile, help="YAML file of option values (keys use underscores)")
        parent.add_subcommand(name, p, help=help)
        return p

    # tokenizer train
    tok = P(prog="llmscratch tokenizer", description="Tokenizer tools.")
    verbs.add_subcommand("tokenizer", tok, help="train a byte-level BPE tokenizer from scratch")
    tok_verbs = tok.add_subcommands(dest="action", required=True)
    p = verb("train", "Train a byte-level BPE tokenizer (GPT-2's pre-tokenizer) on a corpus.", tok_verbs,
             prog="llmscratch tokenizer train")
    p.add_argument("--data", required=True, help=CORPUS_HELP)
    p.add_argument("--vocab-size", type=int, default=4096, help="target vocabulary size incl. special tokens")
    p.add_argument("--out", type=str, required=True, help="folder to write tokenizer.json into")

    p = verb("prepare", "Tokenize a corpus into train.bin/val.bin token files (uint16/uint32 memmaps).")
    p.add_argument("--data", required=True, help=CORPUS_HELP)
    p.add_argument("--tokenizer", default="gpt2", help="a tokenizer folder, or `gpt2` (tiktoken's GPT-2 BPE)")
    p.add_argument("--out", required=True, help="folder for train.bin, val.bin, meta.json and the tokenizer")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of random chunks held out")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val chunk draw")

    p = verb("pretrain", "Pretrain a GPT with next-token prediction; checkpoints, metrics.csv and loss.png "
             "go to --out.")
    p.add_argument("--model", default="gpt-mini", help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--data", default="pydocs", help=CORPUS_HELP + ", or a folder made by `prepare`")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or `gpt2` (default: the prepared folder's, else gpt2)")
    p.add_argument("--out", required=True, help="run folder (model files, checkpoints/, metrics.csv, loss.png)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--context-length", type=int, default=None, help="override the preset's context length")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    p.add_argument("--sample-prompt", default="The", help="prompt of the periodic samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_class_arguments(TrainConfig, "train", skip={"progress"})

    p = verb("generate", "Generate text from a checkpoint folder.")
    p.add_argument("checkpoint", help="checkpoint folder, training run folder, or LoRA adapter folder (its base "
                   "and adapter are merged in memory)")
    p.add_argument("--prompt", required=True,
                   help="text to continue; for an instruction-tuned checkpoint, the request (wrapped in its prompt "
                        "style, and only the answer is printed)")
    p.add_argument("--raw", action="store_true",
                   help="never wrap --prompt in the checkpoint's saved prompt style: continue the text as is")
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as a user turn through the model's own chat template (Llama/Qwen tokenizer "
                        "folders) and stop at its end-of-turn tokens")
    p.add_argument("--system", default=None, help="with --chat: a system message before the user turn")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, e.g. 0.9")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", type=str, action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole window every step")
    p.add_argument("--compile", action="store_true",
                   help="decode through a torch.compile'd static-shape step; pays off for long outputs. GPU: "
                        "CUDA graphs, several times faster per token. CPU: one compiled graph for every layer "
                        "around the packed weights, ~1.2x the default speed; compiling takes ~18 s the "
                        "first time on a machine, ~5 s once PyTorch's compile cache holds it (GPT-2 124M). Uses the "
                        "KV cache: not with --no-kv-cache")
    p.add_argument("--no-pack", action="store_true",
                   help="on CPU, keep plain nn.Linear weights instead of oneDNN-packed ones (slower decoding)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto",
                   help="auto (bf16 on CUDA and bf16-capable CPUs, else fp32) | fp32 | bf16 | fp16")

    p = verb("info", "Parameters, FLOPs per token and memory estimates of a checkpoint or preset.")
    p.add_argument("target", help=f"checkpoint folder or preset ({', '.join(PRESETS)})")
    p.add_argument("--batch-size", type=int, default=8, help="batch size for the activation estimate")

    from llmscratch.weights.hub import MODELS

    p = verb("download", "Download a pretrained model — OpenAI's GPT-2 (from the Hugging Face hub, or OpenAI's own "
             "release), Llama 3.2, Qwen3 — into the cache (resumable, size/sha256-checked) and convert it into a "
             "checkpoint folder. Environment: HF_ENDPOINT (a hub mirror), HF_TOKEN (sent as a bearer token; Llama "
             "is gated), HF_HUB_OFFLINE=1 (cache only).")
    p.add_argument("model", help=" | ".join(MODELS))
    p.add_argument("--out", required=True, help="checkpoint folder to create (must be new or empty)")
    p.add_argument("--source", default="hf",
                   help="hf: the hub's model.safetensors (default) | openai: OpenAI's TensorFlow checkpoint")
    p.add_argument("--endpoint", default=None,
                   help="server to download from instead (a mirror; default: $HF_ENDPOINT, else the official one)")
    p.add_argument("--dtype", default="fp32",
                   help="fp32 | bf16 | fp16: dtype of the saved weights (Llama/Qwen are released in bf16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    conv = P(prog="llmscratch convert", description="Convert weights between formats.")
    verbs.add_subcommand("convert", conv, help="convert GPT-2 (Hugging Face, OpenAI), Llama and Qwen3 weights to "
                         "our checkpoints and back")
    conv_verbs = conv.add_subcommands(dest="action", required=True)
    p = verb("from-hf", "A Hugging Face GPT-2, Llama or Qwen3 folder (model.safetensors, a sharded index, or "
             "pytorch_model.bin read with weights_only) → our checkpoint folder.", conv_verbs,
             prog="llmscratch convert from-hf")
    p.add_argument("hf_dir", help="Hugging Face model folder with config.json")
    p.add_argument("out", help="checkpoint folder to write")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or `gpt2` (default: the folder's vocab.json + merges.txt)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16: dtype of the saved weights")
    p = verb("from-openai", "A folder of OpenAI's original GPT-2 release (hparams.json, checkpoint, model.ckpt.index, "
             "model.ckpt.data-*, encoder.json, vocab.bpe) → our checkpoint folder; no TensorFlow needed.",
             conv_verbs, prog="llmscratch convert from-openai")
    p.add_argument("tf_dir", help="folder with hparams.json and model.ckpt.*")
    p.add_argument("out", help="checkpoint folder to write (must be new or empty)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or `gpt2` (default: the folder's encoder.json + vocab.bpe)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16: dtype of the saved weights")
    p = verb("to-hf", "Our checkpoint folder → a folder transformers loads (GPT2LMHeadModel, or LlamaForCausalLM / "
             "Qwen3ForCausalLM for those configurations), with vocab.json + merges.txt for AutoTokenizer when the "
             "tokenizer is a byte-level BPE with GPT-2's regex.",
             conv_verbs, prog="llmscratch convert to-hf")
    p.add_argument("checkpoint", help="our checkpoint folder")
    p.add_argument("out", help="Hugging Face folder to write (must be new or empty)")

    # finetune classify | instruct (| dpo): each fine-tuning verb registers itself in this group.
    ft = P(prog="llmscratch finetune", description="Fine-tune a checkpoint with the one trainer.")
    verbs.add_subcommand("finetune", ft, help="fine-tune a checkpoint (classification, instructions, DPO; "
                         "optionally LoRA adapters only)")
    ft_verbs = ft.add_subcommands(dest="action", required=True)

    finetuning = argv is None or "finetune" in argv
    p = verb("instruct", "Instruction-tune a checkpoint (the book's chapter 7): answers learned after a prompt "
             "style, prompt tokens masked; then writes the test split's answers to --out/test_responses.json.",
             ft_verbs, prog="llmscratch finetune instruct")
    if finetuning:
        _instruct_arguments(p)
        _lora_arguments(p)

    p = verb("classify", "Fine-tune a checkpoint into a text classifier (the book's chapter 6): a class head read "
             "at each text's last real token. Writes the classifier, labels.json, metrics.json (accuracy and loss "
             "per split, confusion matrix), loss.png, accuracy.png and confusion.png to --out.", ft_verbs,
             prog="llmscratch finetune classify")
    if finetuning:
        _classify_arguments(p)
        _lora_arguments(p, "the class head is trained in full beside them, and saved with the adapter; "
                           "--trainable is ignored")

    p = verb("dpo", "Preference-tune an instruction model with DPO (Direct Preference Optimization; the book's "
             "chapter-7 bonus): the chosen answer of each pair is made likelier than the rejected one, relative to "
             "a frozen reference (the starting model). Writes the model (or adapter), metrics.csv with rewards, "
             "loss.png, dpo.png, dpo_metrics.json (validation metrics and sample answers before/after) and "
             "test_responses.json to --out.", ft_verbs, prog="llmscratch finetune dpo")
    if finetuning:
        _dpo_arguments(p)
        _lora_arguments(p, "the reference is then the same model with its adapters off (no second model)")

    lo = P(prog="llmscratch lora", description="LoRA adapters written by `finetune ... --lora-rank R`.")
    verbs.add_subcommand("lora", lo, help="merge a LoRA adapter into a full checkpoint, or export it for Hugging "
                         "Face PEFT")
    lo_verbs = lo.add_subcommands(dest="action", required=True)
    p = verb("merge", "Base checkpoint + adapter → a full checkpoint folder (weights merged: W + alpha/r·BA), with "
             "the adapter's prompt style and labels; generate, classify, eval and convert use it like any other.",
             lo_verbs, prog="llmscratch lora merge")
    p.add_argument("adapter", help="adapter folder (adapter.safetensors + adapter_config.json)")
    p.add_argument("out", help="checkpoint folder to write (must be new or empty)")
    p.add_argument("--base", default=None,
                   help="base checkpoint folder (default: the path recorded in adapter_config.json); its weights "
                        "must be the ones the adapter was trained on (sha256 checked)")
    p = verb("export-peft", "An adapter → Hugging Face PEFT's adapter_config.json + adapter_model.safetensors, for "
             "the base exported by `llmscratch convert to-hf` (GPT-2, Llama, Qwen3): "
             "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), OUT).",
             lo_verbs, prog="llmscratch lora export-peft")
    p.add_argument("adapter", help="adapter folder (adapter.safetensors + adapter_config.json)")
    p.add_argument("out", help="folder to write (must be new or empty)")
    p.add_argument("--base-hf", default=None,
                   help="the Hugging Face export of the base, recorded as base_model_name_or_path (default: the "
                        "base checkpoint's path)")

    p = verb("classify", "Classify texts with a fine-tuned classifier: prints label, probability and text per line.")
    p.add_argument("checkpoint", help="classifier folder written by `llmscratch finetune classify`")
    p.add_argument("texts", nargs="+", help="one or more texts to classify (quote each)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")

    data = P(prog="llmscratch data", description="Make data sets.")
    verbs.add_subcommand("data", data, help="make data sets (synthetic instruction tasks)")
    data_verbs = data.add_subcommands(dest="action", required=True)
    p = verb("synth-instruct", "Write a procedural instruction data set with verifiable answers as "
             "--out/train.jsonl and --out/test.jsonl (each record has a `family`); test items use held-out words "
             "and operands.", data_verbs, prog="llmscratch data synth-instruct")
    p.add_argument("--out", required=True, help="folder for train.jsonl and test.jsonl (or .json with --format json)")
    p.add_argument("--n-train", type=int, default=2000, help="training records per family")
    p.add_argument("--n-test", type=int, default=100, help="test records per family (all distinct)")
    p.add_argument("--families", default=None,
                   help="comma-separated families; default: arithmetic, unit_conversion, comparison, counting, "
                        "first_letter. Copying families for larger models: long_arithmetic, word_reversal, "
                        "spelling, sorting, capitalization, last_word, repeat_word")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw and of the held-out word list")
    p.add_argument("--format", default="jsonl", help="jsonl | json (Alpaca JSON list)")

    ev = P(prog="llmscratch eval", description="Evaluate fine-tuned models.")
    verbs.add_subcommand("eval", ev, help="evaluate answers: exact-match tasks, LLM-as-judge")
    ev_verbs = ev.add_subcommands(dest="action", required=True)
    p = verb("tasks", "Exact-match accuracy per task family on records with known answers (e.g. from `data "
             "synth-instruct`), answering greedily in the checkpoint's prompt style.", ev_verbs,
             prog="llmscratch eval tasks")
    p.add_argument("checkpoint", help="checkpoint folder (instruction-tuned, or a base model with --prompt-style)")
    p.add_argument("data", help="Alpaca JSON/JSONL records with `output` (and `family`) fields")
    p.add_argument("--prompt-style", default=None,
                   help="alpaca | phi3 (default: the style saved with the checkpoint, else alpaca)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer generated")
    p.add_argument("--batch-size", type=int, default=64, help="prompts of equal token length decoded together")
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--json", default=None, help="also write per-family scores and every answer to this JSON file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="fp32",
                   help="fp32 (default: scores that do not depend on the CPU's bf16 support) | bf16 | auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = verb("judge", "Score each answer 0-100 with a judge model behind an OpenAI-compatible chat endpoint "
             "(Ollama, vLLM, llama.cpp, OpenAI); prints the mean and writes per-record scores to "
             "RESPONSES.scores.json.", ev_verbs, prog="llmscratch eval judge")
    p.add_argument("responses", help="JSON list of records with instruction, input, output and the answer "
                   "(e.g. test_responses.json from `finetune instruct`)")
    p.add_argument("--url", default="http://localhost:11434",
                   help="server base URL (…/v1/chat/completions is appended unless given); Ollama's by default")
    p.add_argument("--model", required=True, help="judge model name as the server knows it, e.g. llama3")
    p.add_argument("--response-key", default="model_response", help="record key holding the answer to score")
    p.add_argument("--out", default=None, help="scores file (default: RESPONSES.scores.json beside the input)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply")
    p.add_argument("--retries", type=int, default=3, help="extra tries after a failed request (backoff 1, 2, 4 s...)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding a bearer token, sent when set (Ollama needs none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = verb("quickstart", "Offline end to end on the embedded pydocs corpus: tokenizer, data, a small GPT "
             "pretrained for a few minutes, samples before/after, loss vs the unigram baseline.")
    p.add_argument("--minutes", type=float, default=4.0, help="pretraining time budget")
    p.add_argument("--out", default="runs/quickstart", help="run folder")
    p.add_argument("--model", default="gpt-tiny",
                   help="preset to train (gpt-tiny learns the most per CPU-minute; gpt-mini is ~3x slower)")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return root


def _classify_arguments(p) -> None:
    import dataclasses

    from llmscratch.finetune.defaults import (
        CLASSIFY_DEFAULT_EPOCHS,
        CLASSIFY_DEFAULT_TRAINABLE,
        CLASSIFY_TRAINABLE,
        classify_train_config,
    )
    from llmscratch.train.config import TrainConfig

    p.add_argument("checkpoint", help="pretrained checkpoint folder (e.g. runs/quickstart)")
    p.add_argument("--data", required=True,
                   help="sms-spam (the UCI SMS Spam Collection, downloaded once) or a .tsv/.csv/.jsonl/.json file "
                        "of labelled texts; TSV/CSV with a header row, or headerless as label<TAB>text")
    p.add_argument("--out", required=True, help="folder for the classifier and its metrics and plots")
    p.add_argument("--text-column", default="text", help="column (or JSON key) holding the text")
    p.add_argument("--label-column", default="label", help="column (or JSON key) holding the label")
    p.add_argument("--no-balance", action="store_true",
                   help="keep every example instead of undersampling each class to the smallest one's size")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per text; longer texts are cut (default: the longest text, capped at the context)")
    p.add_argument("--trainable", default=CLASSIFY_DEFAULT_TRAINABLE,
                   help=f"{' | '.join(CLASSIFY_TRAINABLE)}: what is trained; last-block = last transformer block "
                        "+ final norm + class head (the book's choice, with 5 epochs and --train.lr 5e-5 for GPT-2), "
                        "all = every weight (best for small models pretrained briefly)")
    p.add_argument("--epochs", type=float, default=CLASSIFY_DEFAULT_EPOCHS, help="passes over the training split")
    p.add_argument("--max-steps", type=int, default=None,
                   help="optimizer updates (default: epochs x batches per epoch)")
    p.add_argument("--data-seed", type=int, default=123, help="seed of the balancing draw and the 70/10/20 split")
    p.add_argument("--random-init", action="store_true",
                   help="use only the checkpoint's shape and tokenizer, with fresh random weights (the baseline "
                        "that shows what pretraining adds)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a training run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    skip = {"progress", "max_steps", "sample_every"}  # no samples: a classifier does not generate
    p.add_class_arguments(TrainConfig, "train", skip=skip)
    defaults = dataclasses.asdict(classify_train_config())
    p.set_defaults({f"train.{k}": v for k, v in defaults.items() if k not in skip})


def _instruct_arguments(p) -> None:
    from llmscratch.prompts import STYLES
    from llmscratch.train.config import TrainConfig

    p.add_argument("checkpoint", help="pretrained (or already tuned) checkpoint folder, e.g. runs/quickstart")
    p.add_argument("--data", required=True,
                   help="Alpaca JSON list / JSONL (instruction, input, output), OpenAI messages JSONL (one record "
                        "per assistant turn, earlier turns as context), or book-instructions (the book's "
                        "1,100 records, downloaded once)")
    p.add_argument("--out", required=True, help="folder for the tuned model, prompt_style.json, metrics, "
                   "checkpoints/ and test_responses.json")
    p.add_argument("--prompt-style", default="alpaca", help=f"{' | '.join(STYLES)}; saved with the model")
    p.add_argument("--epochs", type=float, default=2.0,
                   help="passes over the training split; sets --train.max_steps (0: use --train.max_steps)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per example after padding (default: the model's context length); longer "
                        "examples lose the end of their answer, and the count is logged")
    p.add_argument("--train-on-prompt", action="store_true",
                   help="learn the prompt tokens too (default: only answer tokens count in the loss)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of records held out for validation")
    p.add_argument("--test-fraction", type=float, default=0.10,
                   help="share of records held out and answered after training (0: none)")
    p.add_argument("--split-seed", type=int, default=123, help="seed of the train/val/test shuffle")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest test-set answer generated")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_class_arguments(TrainConfig, "train", skip={"progress"})
    # Fine-tuning moves a pretrained model a little: a lower peak LR, short warmup, frequent evaluations.
    p.set_defaults({"train.lr": 1e-4, "train.warmup_steps": 10, "train.batch_size": 8, "train.eval_every": 50,
                    "train.eval_batches": 5, "train.save_every": 200, "train.keep_last": 1})


def _lora_arguments(p, note: str = "") -> None:
    from llmscratch.lora_settings import TARGETS_HELP

    p.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank instead of the weights (base frozen); --out then holds "
                        "the adapter alone, which `llmscratch generate` loads and `llmscratch lora merge` merges"
                        + (f"; {note}" if note else ""))
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator: updates are alpha/rank·BA")
    p.add_argument("--lora-targets", default="all", help=f"layers that get adapters: {TARGETS_HELP}")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")


def _lora_settings(a):
    """LoRASettings from the --lora-* flags, or None without --lora-rank."""
    if a.lora_rank is None:
        return None
    from llmscratch.lora_settings import LoRASettings

    settings = LoRASettings(a.lora_rank, a.lora_alpha, a.lora_targets, a.lora_dropout)
    settings.check()
    return settings


def _dpo_arguments(p) -> None:
    import dataclasses

    from llmscratch.finetune.defaults import dpo_train_config
    from llmscratch.prompts import STYLES
    from llmscratch.train.config import TrainConfig

    p.add_argument("checkpoint", help="instruction-tuned checkpoint folder (e.g. from `finetune instruct`)")
    p.add_argument("--data", required=True,
                   help="JSON list or JSONL of preference records: the book's {instruction, input, chosen, "
                        "rejected} or {prompt, chosen, rejected}")
    p.add_argument("--out", required=True, help="folder for the tuned model (or adapter), metrics and plots")
    p.add_argument("--beta", type=float, default=0.1,
                   help="strength of the pull toward the reference: rewards are beta·(log π − log π_ref)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="assumed share of wrong preference labels, in [0, 0.5) (conservative DPO)")
    p.add_argument("--precompute-reference", action="store_true",
                   help="score every pair with the starting model once before training and keep only those "
                        "numbers, instead of a frozen second model in memory")
    p.add_argument("--average-logprobs", action="store_true",
                   help="compare mean instead of summed answer-token log-probs (the book's variant; the paper sums)")
    p.add_argument("--prompt-style", default=None,
                   help=f"{' | '.join(STYLES)} (default: the style saved with the checkpoint, else alpaca)")
    p.add_argument("--epochs", type=float, default=1.0,
                   help="passes over the training pairs; sets --train.max_steps (0: use --train.max_steps)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per prompt + answer (default: the model's context length); longer answers are cut")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of records held out for validation")
    p.add_argument("--test-fraction", type=float, default=0.10,
                   help="share of records held out and answered after training (0: none)")
    p.add_argument("--split-seed", type=int, default=123, help="seed of the train/val/test shuffle")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest answer generated")
    p.add_argument("--samples", type=int, default=3,
                   help="test prompts answered before and after training, printed and kept in dpo_metrics.json")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_class_arguments(TrainConfig, "train", skip={"progress", "sample_every"})
    defaults = dataclasses.asdict(dpo_train_config())
    p.set_defaults({f"train.{k}": v for k, v in defaults.items() if k not in ("progress", "sample_every")})


def _train_config(a):
    """The TrainConfig of a training verb's parsed `--train.*` options (and `--no-progress`)."""
    from llmscratch.train.config import TrainConfig

    return TrainConfig(**{k: v for k, v in vars(a.train).items() if not k.startswith("__")},
                       progress=not a.no_progress)


def _version() -> str:
    from llmscratch import __version__

    return f"llmscratch {__version__}"


# --- verbs ------------------------------------------------------------------------------------------------
def cmd_tokenizer_train(a) -> None:
    from llmscratch.data import load_corpus
    from llmscratch.tokenizer import BPETokenizer
    from llmscratch.train.pretrain import check_out_dir

    docs = load_corpus(a.data)
    check_out_dir(Path(a.out))
    tok = BPETokenizer.train(docs, a.vocab_size)
    tok.save(a.out)
    print(f"trained a {tok.vocab_size}-token BPE on {a.data}; saved to {a.out}")


def cmd_prepare(a) -> None:
    from llmscratch.tokenizer import load_tokenizer
    from llmscratch.train.pretrain import check_out_dir, prepare

    tok = load_tokenizer(a.tokenizer)
    check_out_dir(Path(a.out))
    meta = prepare(a.data, tok, a.out, val_fraction=a.val_fraction, seed=a.seed)
    print(f"wrote {meta.train_tokens:,} train and {meta.val_tokens:,} val tokens ({meta.dtype}) to {a.out}")


def cmd_pretrain(a) -> None:
    from llmscratch.train.pretrain import run_pretrain

    cfg = _train_config(a)
    r = run_pretrain(a.model, a.data, a.out, a.tokenizer, a.resume, cfg, a.context_length, a.dropout,
                     a.sample_prompt, progress=not a.no_progress)
    val = f", val loss {r.val_loss:.3f}" if r.val_loss is not None else ""
    note = {"time": " (time budget reached)", "interrupt": " (interrupted; resume with --resume)"}.get(
        r.stopped_early, "")
    print(f"stopped at step {r.step}{note}: {r.tokens:,} tokens{val}. Model in {a.out}")


def cmd_generate(a) -> None:
    from llmscratch.checkpoint import find_model_folder, load
    from llmscratch.generate import stream
    from llmscratch.lora import is_adapter_folder, load_merged
    from llmscratch.model.packed import pack_for_cpu_inference
    from llmscratch.prompts import load_style
    from llmscratch.runtime import inference_dtype, resolve_device

    if a.compile and a.no_kv_cache:
        raise UserError("--compile compiles the KV-cached decoding step: drop --no-kv-cache, or --compile")
    device = resolve_device(a.device)
    adapter = is_adapter_folder(a.checkpoint) and not (Path(a.checkpoint) / "model.safetensors").exists()
    load_fn = load_merged if adapter else load  # an adapter: base + adapter, merged in memory
    model, tok = load_fn(a.checkpoint, device=device, dtype=inference_dtype(a.dtype, device))
    if not a.no_pack:
        pack_for_cpu_inference(model)  # CPU only; a no-op elsewhere
    # An instruction-tuned checkpoint: wrap the request in its prompt style, stop at its end of turn, and
    # print only the answer.
    style = None if a.raw or a.chat else load_style(Path(a.checkpoint) if adapter
                                                     else find_model_folder(a.checkpoint))
    prompt, shown, stop = a.prompt, a.prompt, list(a.stop or ())
    if a.chat:  # the model's own chat template (a Hugging Face tokenizer folder: Llama 3, Qwen3)
        if not callable(getattr(tok, "apply_chat_template", None)) or not tok.chat_template:
            raise UserError(f"{a.checkpoint}: --chat needs a tokenizer with a chat template (a Llama/Qwen model "
                            "converted from its Hugging Face folder); use --prompt alone")
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [
            {"role": "user", "content": a.prompt}]
        prompt, shown = tok.apply_chat_template(messages, add_generation_prompt=True), ""
        stop += [tok.decode([i]) for i in tok.stop_ids]  # <|eot_id|>, <|im_end|>, ...
    elif style is not None:
        prompt, shown, stop = style.wrap(a.prompt), "", stop + list(style.stop)
    if a.compile:  # a wait of seconds before the first token: say why
        sys.stderr.write("llmscratch: compiling the decoding step (a few seconds; up to ~20 s the first time on a "
                         "machine)\n")
    pieces = stream(model, tok, prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                    top_k=a.top_k or None, top_p=a.top_p, seed=a.seed, stop=stop,
                    use_cache=not a.no_kv_cache, compile=a.compile)
    if style is not None or a.chat:
        pieces = _strip_leading_space(pieces)
    if a.stream:
        sys.stdout.write(shown)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(shown + "".join(pieces))


def _strip_leading_space(pieces):
    """The pieces of an answer without the whitespace a model may put before its first word."""
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece


def cmd_info(a) -> None:
    from llmscratch.checkpoint import CONFIG, find_model_folder
    from llmscratch.config import PRESETS, ModelConfig
    from llmscratch.model.transformer import flops_per_token

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
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim
    # Activations saved for backward, per token per layer, roughly 34·d bytes in 16-bit (Korthikanti et al.
    # 2022, eq. 1, no recomputation, without its 5·h·T term for the attention-score matrices: SDPA's fused
    # kernels never store them); reported for bf16 autocast.
    act = B * T * cfg.n_layers * 34 * cfg.d_model
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
        ("KV cache", f"{kv_per_token * 2 / 1024:.1f} KiB/token in bf16; "
                     f"full context {kv_per_token * 2 * T / 2**20:.1f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cmd_convert_from_hf(a) -> None:
    from llmscratch.weights.convert import from_hf

    model = from_hf(a.hf_dir, a.out, a.tokenizer, a.dtype)
    print(f"converted {a.hf_dir} ({model.num_params() / 1e6:.1f}M parameters) to {a.out}")


def cmd_convert_from_openai(a) -> None:
    from llmscratch.weights.convert import from_openai

    model = from_openai(a.tf_dir, a.out, a.tokenizer, a.dtype)
    print(f"converted {a.tf_dir} ({model.num_params() / 1e6:.1f}M parameters) to {a.out}")


def cmd_convert_to_hf(a) -> None:
    from llmscratch.weights.convert import to_hf

    note = to_hf(a.checkpoint, a.out)
    print(f"wrote {a.out}: {note}; transformers.GPT2LMHeadModel.from_pretrained loads it")


def cmd_download(a) -> None:
    from llmscratch.weights.hub import download_pretrained

    model = download_pretrained(a.model, a.out, a.source, a.endpoint, a.dtype, progress=not a.no_progress)
    print(f"downloaded {a.model} ({model.num_params() / 1e6:.1f}M parameters) to {a.out}; try "
          f"`llmscratch generate {a.out} --prompt \"Hello, I'm a language model,\"`")


def cmd_finetune_classify(a) -> None:
    from llmscratch.finetune.classify import finetune_classify

    cfg = _train_config(a)
    finetune_classify(a.checkpoint, a.data, a.out, text_column=a.text_column, label_column=a.label_column,
                      balance=not a.no_balance, max_length=a.max_length, trainable=a.trainable, epochs=a.epochs,
                      max_steps=a.max_steps, data_seed=a.data_seed, random_init=a.random_init, train_cfg=cfg,
                      resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress, lora=_lora_settings(a))


def cmd_classify(a) -> None:
    from llmscratch.finetune.classify import Classifier
    from llmscratch.runtime import resolve_device

    clf = Classifier.load(a.checkpoint, device=resolve_device(a.device))
    for text, (label, prob) in zip(a.texts, clf.predict(a.texts)):
        print(f"{label}\t{prob:.3f}\t{text}")


def cmd_finetune_instruct(a) -> None:
    from llmscratch.finetune.instruct import run_instruct

    cfg = _train_config(a)
    r = run_instruct(a.checkpoint, a.data, a.out, prompt_style=a.prompt_style, train_cfg=cfg,
                     epochs=a.epochs or None, max_length=a.max_length, train_on_prompt=a.train_on_prompt,
                     val_fraction=a.val_fraction, test_fraction=a.test_fraction, split_seed=a.split_seed,
                     max_new_tokens=a.max_new_tokens, resume=a.resume, progress=not a.no_progress,
                     lora=_lora_settings(a))
    val = f", val loss {r.train.val_loss:.3f}" if r.train.val_loss is not None else ""
    note = {"time": " (time budget reached)", "interrupt": " (interrupted; resume with --resume)"}.get(
        r.train.stopped_early, "")
    print(f"stopped at step {r.train.step}{note}{val}. Model in {a.out} (prompt style {a.prompt_style}); try:\n"
          f'  llmscratch generate {a.out} --prompt "Name three fruits." --temperature 0')


def cmd_finetune_dpo(a) -> None:
    from llmscratch.finetune.dpo import run_dpo

    cfg = _train_config(a)
    r = run_dpo(a.checkpoint, a.data, a.out, prompt_style=a.prompt_style, beta=a.beta,
                label_smoothing=a.label_smoothing, precompute=a.precompute_reference,
                average_logprobs=a.average_logprobs, train_cfg=cfg, epochs=a.epochs or None, max_length=a.max_length,
                val_fraction=a.val_fraction, test_fraction=a.test_fraction, split_seed=a.split_seed,
                max_new_tokens=a.max_new_tokens, n_samples=a.samples, lora=_lora_settings(a), resume=a.resume,
                progress=not a.no_progress)
    for s in r.samples:
        print(f"\n### {s['instruction']}" + (f"\n{s['input']}" if s["input"] else ""))
        if s["before"] is not None:
            print(f"before: {s['before']}")
        print(f"after:  {s['after']}")
    note = {"time": " (time budget reached)", "interrupt": " (interrupted; resume with --resume)"}.get(
        r.train.stopped_early, "")
    print(f"\nstopped at step {r.train.step}{note}: validation reward margin {r.before['reward_margin']:.3f} → "
          f"{r.after['reward_margin']:.3f}, reward accuracy {r.before['reward_accuracy']:.1%} → "
          f"{r.after['reward_accuracy']:.1%}. Output in {a.out}; try:\n"
          f'  llmscratch generate {a.out} --prompt "Rewrite the sentence: The cat sat." --temperature 0')


def cmd_lora_merge(a) -> None:
    from llmscratch.lora import merge_adapter_folder

    merge_adapter_folder(a.adapter, a.out, base=a.base)
    print(f"merged {a.adapter} into its base; full checkpoint in {a.out}")


def cmd_lora_export_peft(a) -> None:
    from llmscratch.lora import export_peft

    export_peft(a.adapter, a.out, base_hf=a.base_hf)
    print(f"wrote {a.out}/adapter_config.json and adapter_model.safetensors; load with "
          "peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), "
          f"{str(a.out)!r}) where BASE_HF is `llmscratch convert to-hf` of the base")


def cmd_data_synth_instruct(a) -> None:
    from collections import Counter

    from llmscratch.data.synth import synth_instructions, write_records
    from llmscratch.train.pretrain import check_out_dir

    if a.format not in ("jsonl", "json"):
        raise UserError(f"--format {a.format}: use jsonl or json")
    families = [f.strip() for f in a.families.split(",") if f.strip()] if a.families else None
    train, test = synth_instructions(a.n_train, a.n_test, families, a.seed)
    out = Path(a.out)
    check_out_dir(out)
    for name, records in (("train", train), ("test", test)):
        write_records(records, out / f"{name}.{a.format}")
    counts = Counter(r["family"] for r in test)
    print(f"wrote {len(train):,} train and {len(test):,} test records ({len(counts)} families: "
          f"{', '.join(counts)}) to {out}/train.{a.format} and {out}/test.{a.format}")


def cmd_eval_tasks(a) -> None:
    from llmscratch.eval.tasks import run_tasks

    run_tasks(a.checkpoint, a.data, prompt_style=a.prompt_style, max_new_tokens=a.max_new_tokens,
              batch_size=a.batch_size, limit=a.limit, json_out=a.json, device=a.device, dtype=a.dtype,
              progress=not a.no_progress)


def cmd_eval_judge(a) -> None:
    import os

    from llmscratch.eval.judge import ChatClient, judge_file

    if a.retries < 0 or a.timeout <= 0:
        raise UserError("--retries must be >= 0 and --timeout positive")
    client = ChatClient(a.url, a.model, timeout=a.timeout, retries=a.retries,
                        api_key=os.environ.get(a.api_key_env) or None)
    r = judge_file(a.responses, client, response_key=a.response_key, out=a.out, progress=not a.no_progress)
    mean = f"{r.mean:.2f}" if r.mean is not None else "n/a"
    unscored = f" ({r.unscored} replies without a usable score)" if r.unscored else ""
    print(f"mean score {mean} over {r.scored} responses{unscored}; per-record scores in {r.out}")


def cmd_quickstart(a) -> None:
    from llmscratch.train.pretrain import quickstart

    quickstart(a.out, a.minutes, a.vocab_size, a.model, a.device, overwrite=a.overwrite,
               progress=not a.no_progress)


# verb → handler; a group of verbs maps to a dict of action → handler.
COMMANDS = {
    "tokenizer": {"train": cmd_tokenizer_train},
    "prepare": cmd_prepare,
    "pretrain": cmd_pretrain,
    "generate": cmd_generate,
    "info": cmd_info,
    "quickstart": cmd_quickstart,
    "download": cmd_download,
    "convert": {
        "from-hf": cmd_convert_from_hf,
        "from-openai": cmd_convert_from_openai,
        "to-hf": cmd_convert_to_hf,
    },
    "classify": cmd_classify,
    "finetune": {
        "instruct": cmd_finetune_instruct,
        "classify": cmd_finetune_classify,
        "dpo": cmd_finetune_dpo,
    },
    "lora": {
        "merge": cmd_lora_merge,
        "export-peft": cmd_lora_export_peft,
    },
    "data": {
        "synth-instruct": cmd_data_synth_instruct,
    },
    "eval": {
        "tasks": cmd_eval_tasks,
        "judge": cmd_eval_judge,
    },
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv).parse_args(argv)
        sub = getattr(args, args.verb)
        handler = COMMANDS[args.verb]
        if isinstance(handler, dict):
            handler, sub = handler[sub.action], getattr(sub, sub.action)
        handler(sub)
    except UserError as exc:
        sys.stderr.write(f"llmscratch: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("llmscratch: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
