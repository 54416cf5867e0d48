"""The fine-tuning verbs, `finetune instruct | classify | dpo`. Their defaults come from
`llmscratch.finetune.defaults`, which the Python API reads too."""

from __future__ import annotations

from llmscratch.cli.base import (
    Fraction,
    Group,
    LabelSmoothing,
    NonNegativeFloat,
    NonNegativeInt,
    Optional,
    PositiveFloat,
    PositiveInt,
    Seed,
    Verb,
    _train_config,
    exit_if_interrupted,
    overwrite_option,
    progress_option,
    run_summary,
    train_options,
)


# --- options every fine-tuning verb has -------------------------------------------------------------------
def _io_options(p, checkpoint: str, data: str, out: str) -> None:
    """The checkpoint to start from (positional), the `--data` to tune on and the `--out` folder; the help texts
    say what each verb reads and writes."""
    p.add_argument("checkpoint", help=checkpoint)
    p.add_argument("--data", required=True, help=data)
    p.add_argument("--out", required=True, help=out)


def _run_options(p, progress: str) -> None:
    """`--resume`, `--overwrite` and `--no-progress` (help `progress`) of a fine-tuning run."""
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    overwrite_option(p, run=True)
    progress_option(p, progress)


def _run_kwargs(a) -> dict:
    """What every fine-tuning function takes from `_run_options`, `--train.*` and `--lora-*`."""
    return dict(train_cfg=_train_config(a), resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress,
                lora=_lora_settings(a))


def _lora_options(p, note: str = "") -> None:
    from llmscratch.lora_settings import TARGETS_HELP

    p.add_argument("--lora-rank", type=Optional[PositiveInt], default=None,
                   help="train LoRA adapters of this rank instead of the weights (base frozen); --out then holds "
                        "the adapter alone, which `llmscratch generate` loads and `llmscratch lora merge` merges"
                        + (f"; {note}" if note else ""))
    p.add_argument("--lora-alpha", type=PositiveFloat, default=16.0,
                   help="LoRA scale numerator: updates are alpha/rank·BA")
    p.add_argument("--lora-targets", default="all", help=f"layers that get adapters: {TARGETS_HELP}")
    p.add_argument("--lora-dropout", type=Fraction, default=0.0, help="dropout on the adapters' input")


def _speaks() -> bool:
    """Whether this process prints the run's summary: rank 0 under torchrun, where every rank runs the verb."""
    from llmscratch.train.distributed import ranks

    return ranks().main


def _lora_settings(a):
    """LoRASettings from the --lora-* flags, or None without --lora-rank."""
    if a.lora_rank is None:
        return None
    from llmscratch.lora_settings import LoRASettings

    settings = LoRASettings(a.lora_rank, a.lora_alpha, a.lora_targets, a.lora_dropout)
    settings.check()
    return settings


# --- options of the verbs that answer held-out records (instruct, dpo) ---------------------------------------
def _split_options(p, defaults, answer_help: str) -> None:
    """`--val-fraction`, `--test-fraction`, `--split-seed` (the records held out) and `--max-new-tokens` (the longest
    answer to them), with the `defaults` of `llmscratch.finetune.defaults`."""
    p.add_argument("--val-fraction", type=Fraction, default=defaults.val_fraction,
                   help="share of records held out for validation")
    p.add_argument("--test-fraction", type=Fraction, default=defaults.test_fraction,
                   help="share of records held out and answered after training (0: none)")
    p.add_argument("--split-seed", type=Seed, default=defaults.split_seed, help="seed of the train/val/test shuffle")
    p.add_argument("--max-new-tokens", type=PositiveInt, default=defaults.max_new_tokens, help=answer_help)


def _split_kwargs(a) -> dict:
    """The values of `_split_options`, as the fine-tuning functions name them."""
    return {k: getattr(a, k) for k in ("val_fraction", "test_fraction", "split_seed", "max_new_tokens")}


# --- finetune instruct ------------------------------------------------------------------------------------
def _finetune_instruct_parser(p) -> None:
    from llmscratch.finetune.defaults import INSTRUCT, instruct_train_config
    from llmscratch.prompts import STYLES

    _io_options(p, "pretrained (or already tuned) checkpoint folder, e.g. runs/quickstart",
                "Alpaca JSON list / JSONL (instruction, input, output), OpenAI messages JSONL (one record per "
                "assistant turn, earlier turns as context), or book-instructions (the book's 1,100 records, "
                "downloaded once)",
                "folder for the tuned model, prompt_style.json, metrics, checkpoints/ and test_responses.json")
    p.add_argument("--prompt-style", default=INSTRUCT.prompt_style, help=f"{' | '.join(STYLES)}; saved with the model")
    p.add_argument("--epochs", type=NonNegativeFloat, default=INSTRUCT.epochs,
                   help="passes over the training split; sets --train.max_steps (0: use --train.max_steps)")
    p.add_argument("--max-length", type=Optional[PositiveInt], default=None,
                   help="tokens per example after padding (default: the model's context length); longer "
                        "examples lose the end of their answer, and the count is logged")
    p.add_argument("--train-on-prompt", action="store_true",
                   help="learn the prompt tokens too (default: only answer tokens count in the loss)")
    _split_options(p, INSTRUCT, "longest test-set answer generated")
    _run_options(p, "no progress bars")
    train_options(p, defaults=instruct_train_config())
    _lora_options(p)


def cmd_finetune_instruct(a) -> None:
    from llmscratch.finetune.instruct import run_instruct

    r = run_instruct(a.checkpoint, a.data, a.out, prompt_style=a.prompt_style, epochs=a.epochs or None,
                     max_length=a.max_length, train_on_prompt=a.train_on_prompt, **_split_kwargs(a),
                     **_run_kwargs(a))
    if not _speaks():
        exit_if_interrupted(r.train)
        return
    print(run_summary(r.train, a.out, r.files))
    exit_if_interrupted(r.train)
    what = "the adapter (base + adapter merged in memory)" if r.adapter else "the model"
    print(f"try {what} (prompt style {a.prompt_style}):\n"
          f'  llmscratch generate {a.out} --prompt "Name three fruits." --temperature 0')


# --- finetune classify ------------------------------------------------------------------------------------
def _finetune_classify_parser(p) -> None:
    from llmscratch.finetune.defaults import CLASSIFY, CLASSIFY_TRAINABLE, classify_train_config

    _io_options(p, "pretrained checkpoint folder (e.g. runs/quickstart)",
                "sms-spam (the UCI SMS Spam Collection, downloaded once) or a .tsv/.csv/.jsonl/.json file of "
                "labelled texts; TSV/CSV with a header row, or headerless as label<TAB>text",
                "folder for the classifier and its metrics and plots")
    p.add_argument("--text-column", default=CLASSIFY.text_column, help="column (or JSON key) holding the text")
    p.add_argument("--label-column", default=CLASSIFY.label_column, help="column (or JSON key) holding the label")
    p.add_argument("--no-balance", action="store_true",
                   help="keep every example instead of undersampling each class to the smallest one's size")
    p.add_argument("--max-length", type=Optional[PositiveInt], default=None,
                   help="tokens per text; longer texts are cut (default: the longest text, capped at the context)")
    p.add_argument("--trainable", default=CLASSIFY.trainable,
                   help=f"{' | '.join(CLASSIFY_TRAINABLE)}: what is trained; last-block = last transformer block "
                        "+ final norm + class head (the book's choice, with 5 epochs and --train.lr 5e-5 for GPT-2), "
                        "all = every weight (best for small models pretrained briefly)")
    p.add_argument("--epochs", type=PositiveFloat, default=CLASSIFY.epochs, help="passes over the training split")
    p.add_argument("--max-steps", type=Optional[PositiveInt], default=None,
                   help="optimizer updates (default: epochs x batches per epoch)")
    p.add_argument("--data-seed", type=Seed, default=CLASSIFY.data_seed,
                   help="seed of the balancing draw and the 70/10/20 split")
    p.add_argument("--random-init", action="store_true",
                   help="use only the checkpoint's shape and tokenizer, with fresh random weights (the baseline "
                        "that shows what pretraining adds)")
    _run_options(p, "no progress bar")
    # no samples: a classifier does not generate
    train_options(p, skip=("progress", "max_steps", "sample_every"), defaults=classify_train_config())
    _lora_options(p, "the class head is trained in full beside them, and saved with the adapter; --trainable is "
                     "ignored")


def cmd_finetune_classify(a) -> None:
    from llmscratch.finetune.classify import finetune_classify

    r = finetune_classify(a.checkpoint, a.data, a.out, text_column=a.text_column, label_column=a.label_column,
                      balance=not a.no_balance, max_length=a.max_length, trainable=a.trainable, epochs=a.epochs,
                      max_steps=a.max_steps, data_seed=a.data_seed, random_init=a.random_init, **_run_kwargs(a))
    exit_if_interrupted(r.train)


# --- finetune dpo -----------------------------------------------------------------------------------------
def _finetune_dpo_parser(p) -> None:
    from llmscratch.finetune.defaults import DPO, dpo_train_config
    from llmscratch.prompts import STYLES

    _io_options(p, "instruction-tuned checkpoint folder (e.g. from `finetune instruct`)",
                "JSON list or JSONL of preference records: the book's {instruction, input, chosen, rejected} or "
                "{prompt, chosen, rejected}",
                "folder for the tuned model (or adapter), metrics and plots")
    p.add_argument("--beta", type=PositiveFloat, default=DPO.beta,
                   help="strength of the pull toward the reference: rewards are beta·(log π − log π_ref)")
    p.add_argument("--label-smoothing", type=LabelSmoothing, default=DPO.label_smoothing,
                   help="assumed share of wrong preference labels, in [0, 0.5) (conservative DPO)")
    p.add_argument("--precompute-reference", action="store_true",
                   help="score every pair with the starting model once before training and keep only those "
                        "numbers, instead of a frozen second model in memory")
    p.add_argument("--average-logprobs", action="store_true",
                   help="compare mean instead of summed answer-token log-probs (the book's variant; the paper sums)")
    p.add_argument("--prompt-style", default=None,
                   help=f"{' | '.join(STYLES)} (default: the style saved with the checkpoint, else alpaca)")
    p.add_argument("--epochs", type=NonNegativeFloat, default=DPO.epochs,
                   help="passes over the training pairs; sets --train.max_steps (0: use --train.max_steps)")
    p.add_argument("--max-length", type=Optional[PositiveInt], default=None,
                   help="tokens per prompt + answer (default: the model's context length); longer answers are cut")
    _split_options(p, DPO, "longest answer generated")
    p.add_argument("--samples", type=NonNegativeInt, default=DPO.samples,
                   help="test prompts answered before and after training, printed and kept in dpo_metrics.json")
    _run_options(p, "no progress bars")
    train_options(p, skip=("progress", "sample_every"), defaults=dpo_train_config())
    _lora_options(p, "the reference is then the same model with its adapters off (no second model)")


def cmd_finetune_dpo(a) -> None:
    from llmscratch.finetune.dpo import run_dpo

    r = run_dpo(a.checkpoint, a.data, a.out, prompt_style=a.prompt_style, beta=a.beta,
                label_smoothing=a.label_smoothing, precompute=a.precompute_reference,
                average_logprobs=a.average_logprobs, epochs=a.epochs or None, max_length=a.max_length,
                n_samples=a.samples, **_split_kwargs(a), **_run_kwargs(a))
    if not _speaks():  # the other ranks stop after training, with no report
        exit_if_interrupted(r.train)
        return
    before, after = r.metrics["before"], r.metrics["after"]
    for sample in r.metrics["samples"]:
        print(f"\n### {sample['instruction']}" + (f"\n{sample['input']}" if sample["input"] else ""))
        if sample["before"] is not None:
            print(f"before: {sample['before']}")
        print(f"after:  {sample['after']}")
    print(f"\nvalidation reward margin {before['reward_margin']:.3f} → {after['reward_margin']:.3f}, reward accuracy "
          f"{before['reward_accuracy']:.1%} → {after['reward_accuracy']:.1%}")
    print(run_summary(r.train, a.out, r.files))
    exit_if_interrupted(r.train)
    print(f'try: llmscratch generate {a.out} --prompt "Rewrite the sentence: The cat sat." --temperature 0')


FINETUNE = Group("Fine-tune a checkpoint with the one trainer.", "fine-tune a checkpoint (classification, "
                 "instructions, DPO; optionally LoRA adapters only)", {
    "instruct": Verb("Instruction-tune a checkpoint (the book's chapter 7): answers learned after a prompt style, "
                     "prompt tokens masked; then writes the test split's answers to --out/test_responses.json.",
                     _finetune_instruct_parser, cmd_finetune_instruct),
    "classify": Verb("Fine-tune a checkpoint into a text classifier (the book's chapter 6): a class head read at "
                     "each text's last real token. Writes the classifier, labels.json, metrics.json (accuracy and "
                     "loss per split, confusion matrix), loss.png, accuracy.png and confusion.png to --out.",
                     _finetune_classify_parser, cmd_finetune_classify),
    "dpo": Verb("Preference-tune an instruction model with DPO (Direct Preference Optimization; the book's chapter-7 "
                "bonus): the chosen answer of each pair is made likelier than the rejected one, relative to a frozen "
                "reference (the starting model). Writes the model (or adapter), metrics.csv with rewards, loss.png, "
                "dpo.png, dpo_metrics.json (validation metrics and sample answers before/after) and "
                "test_responses.json to --out.", _finetune_dpo_parser, cmd_finetune_dpo),
})
