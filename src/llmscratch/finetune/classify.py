"""Classification fine-tuning (the book's chapter 6): a pretrained GPT whose LM head is replaced by a class head.

The classifier is the same `GPT` with `config.n_classes` set, so `lm_head` maps d_model to class logits and every
checkpoint tool (save, load, info) works on it unchanged. The class is read at the **last real token** of each
sequence: with causal attention it is the only position that has seen the whole text, and with right padding
position -1 would be a pad token for every text shorter than the batch's longest.

    model, tok = llmscratch.load("runs/quickstart")
    clf = build_classifier(model, n_classes=2)          # copies every weight but the head
    set_trainable(clf, "last-block")                     # last block + final norm + head, as in the book
    logits = class_logits(clf, idx, lengths)             # (B, n_classes)
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmscratch.data.labelled import (
    Encoded,
    class_counts,
    collate_labelled,
    encode_examples,
    label_mapping,
    load_labelled,
    pad_token_id,
)
from llmscratch.errors import UserError
from llmscratch.finetune.defaults import (
    CLASSIFY_DEFAULT_EPOCHS,
    CLASSIFY_DEFAULT_TRAINABLE,
    CLASSIFY_TRAINABLE,
    classify_train_config,
)

LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.json"


# ---------------------------------------------------------------------------------------------------------
# the model


def last_token_features(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, d) at each row's last real position `lengths - 1` → (B, d)."""
    rows = torch.arange(hidden.size(0), device=hidden.device)
    return hidden[rows, lengths.to(hidden.device) - 1]


def class_logits(model, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Class logits (B, n_classes) of right-padded ids (B, T) whose real lengths are `lengths` (B,)."""
    hidden = model.features(idx)  # (B, T, d)
    return model.lm_head(last_token_features(hidden, lengths))  # head on B vectors only, not B·T


def classification_loss(model, batch) -> tuple[torch.Tensor, int, dict]:
    """Mean cross-entropy of a (idx, lengths, labels) batch, the number of texts, and the batch accuracy as an
    extra scalar (logged as train_accuracy / val_accuracy in metrics.csv): the trainer's `loss_fn` (the book's
    calc_loss_batch and calc_accuracy_loader for chapter 6)."""
    idx, lengths, labels = batch
    logits = class_logits(model, idx, lengths).float()
    accuracy = (logits.detach().argmax(-1) == labels).float().mean()
    return F.cross_entropy(logits, labels), labels.numel(), {"accuracy": accuracy}


def build_classifier(base, n_classes: int, seed: int = 0):
    """A classifier GPT with `base`'s weights everywhere but the head, which is new: N(0, init_std) as GPT-2
    initialises linear layers (the book uses nn.Linear's default init; both train the same)."""
    from llmscratch.checkpoint import model_state
    from llmscratch.model import GPT

    cfg = base.config.replace(n_classes=n_classes, tie_embeddings=False)
    state = {k: v.detach().clone() for k, v in model_state(base).items() if k != "lm_head.weight"}
    with torch.device("meta"):
        model = GPT(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) != {"lm_head.weight"}:  # a bug, not a user mistake
        raise RuntimeError(f"classifier weights do not fit: missing {missing}, unexpected {unexpected}")
    ref = state["tok_emb.weight"]
    g = torch.Generator().manual_seed(seed)
    head = torch.empty(n_classes, cfg.d_model, dtype=ref.dtype).normal_(0.0, cfg.init_std, generator=g)
    model.lm_head.weight = torch.nn.Parameter(head.to(ref.device))
    return model


def set_trainable(model, which: str) -> int:
    """Freeze all but the chosen parts; returns the number of trainable parameters.

    head: the class head only; last-block: the last transformer block, the final norm and the head (the book's
    choice); all: every weight (a small model pretrained briefly often gains from adapting all of them)."""
    if which not in CLASSIFY_TRAINABLE:
        raise UserError(f"--trainable {which}: choose one of {', '.join(CLASSIFY_TRAINABLE)}")
    for p in model.parameters():
        p.requires_grad = which == "all"
    parts = [model.lm_head] + ([model.blocks[-1], model.norm] if which == "last-block" else [])
    for part in parts:
        for p in part.parameters():
            p.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate_classifier(model, examples: list[Encoded], pad_id: int, n_classes: int, batch_size: int = 32,
                        device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                        limit: int | None = None) -> dict:
    """Loss, accuracy and confusion matrix (rows: true class, columns: predicted) over `examples` (the first
    `limit` of them when given)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    examples = examples[:limit] if limit else examples
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    total_loss = 0.0
    for start in range(0, len(examples), batch_size):
        idx, lengths, labels = collate_labelled(examples[start:start + batch_size], pad_id, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = class_logits(model, idx, lengths).float()
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        pred = logits.argmax(-1)
        confusion += torch.bincount((labels * n_classes + pred).cpu(), minlength=n_classes ** 2).view(
            n_classes, n_classes)
    model.train(was_training)
    n = len(examples)
    return {"n": n, "loss": total_loss / max(n, 1), "accuracy": confusion.trace().item() / max(n, 1),
            "confusion": confusion.tolist()}


def plot_confusion(confusion: list[list[int]], labels: list[str], out_png: Path, title: str) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.2 * k + 2))
    ax.imshow(confusion, cmap="Blues")
    peak = max(max(row) for row in confusion) or 1
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(confusion[i][j]), ha="center", va="center",
                    color="white" if confusion[i][j] > peak / 2 else "black")
    ax.set_xticks(range(k), labels, rotation=45 if k > 4 else 0)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_accuracy(history: list[dict], out_png: Path) -> Path | None:
    """Train/validation accuracy after each epoch (the book's figure 6.17)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not history:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_accuracy"] for h in history], "o-",
            label=f"train accuracy (first {history[-1]['train_n']} examples)")
    ax.plot(epochs, [h["val_accuracy"] for h in history], "s--", label="validation accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# ---------------------------------------------------------------------------------------------------------
# using a fine-tuned classifier


@dataclass
class Classifier:
    """A fine-tuned classifier with its tokenizer and label names: `Classifier.load(folder).predict(texts)`."""

    model: torch.nn.Module
    tokenizer: object
    labels: list[str]
    max_length: int

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Classifier:
        import yaml

        from llmscratch.checkpoint import CONFIG, HPARAMS, find_model_folder, load
        from llmscratch.config import ModelConfig

        folder = find_model_folder(path)
        cfg = ModelConfig.load(folder / CONFIG)
        if not cfg.n_classes:
            raise UserError(f"{folder}: not a classifier (config.json has no n_classes); fine-tune one with "
                            "`llmscratch finetune classify`")
        model, tok = load(folder, device=device)
        hp = {}
        if (folder / HPARAMS).is_file():
            hp = (yaml.safe_load((folder / HPARAMS).read_text()) or {}).get("classify", {}) or {}
        labels = read_labels(folder) if (folder / LABELS_FILE).is_file() else hp.get("labels")
        labels = labels or [str(i) for i in range(cfg.n_classes)]
        if len(labels) != cfg.n_classes:
            raise UserError(f"{folder}: {len(labels)} label names for {cfg.n_classes} classes; fix {LABELS_FILE}")
        max_length = min(int(hp.get("max_length") or cfg.context_length), cfg.context_length)
        return cls(model, tok, list(labels), max_length)

    @torch.no_grad()
    def probabilities(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """(N, n_classes) class probabilities; each text truncated to the training max length."""
        for i, text in enumerate(texts):
            if not text.strip():
                raise UserError(f"text {i + 1} is empty; give each text some words")
        device = next(self.model.parameters()).device
        pad = pad_token_id(self.tokenizer)
        out = []
        self.model.eval()
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            enc = [Encoded(self.tokenizer.encode(t, allowed_special="none")[:self.max_length], 0) for t in chunk]
            idx, lengths, _ = collate_labelled(enc, pad, device)
            out.append(torch.softmax(class_logits(self.model, idx, lengths).float(), dim=-1).cpu())
        return torch.cat(out)

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        """(label, probability of that label) per text."""
        probs = self.probabilities(texts)
        best = probs.argmax(-1)
        return [(self.labels[int(k)], float(probs[i, k])) for i, k in enumerate(best)]


def write_labels(folder: Path, labels: list[str]) -> None:
    from llmscratch.fileio import atomic_write_text

    atomic_write_text(folder / LABELS_FILE, json.dumps({lab: i for i, lab in enumerate(labels)}, indent=2) + "\n")


def read_labels(folder: Path) -> list[str]:
    """Label names in class-id order from `labels.json` ({label: id})."""
    path = Path(folder) / LABELS_FILE
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read label names ({exc})") from None
    if not isinstance(mapping, dict) or sorted(mapping.values()) != list(range(len(mapping))):
        raise UserError(f"{path}: expected {{label: id}} with ids 0..n-1")
    return [label for label, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


# ---------------------------------------------------------------------------------------------------------
# the fine-tuning stage


def finetune_classify(checkpoint: str | Path, data: str, out: str | Path, *, text_column: str = "text",
                      label_column: str = "label", balance: bool = True, max_length: int | None = None,
                      trainable: str = CLASSIFY_DEFAULT_TRAINABLE, epochs: float = CLASSIFY_DEFAULT_EPOCHS,
                      max_steps: int | None = None, data_seed: int = 123, random_init: bool = False, train_cfg=None,
                      resume: bool = False, overwrite: bool = False, progress: bool = True, lora=None) -> dict:
    """Fine-tune the model in `checkpoint` to classify the texts of `data` (see `load_labelled`); writes the
    classifier, labels.json, metrics.json, loss.png, accuracy.png and confusion.png into `out`.

    `random_init` keeps only the checkpoint's shape and tokenizer and starts from fresh GPT-2-initialised
    weights: the baseline that shows what pretraining contributes (the book compares the two).

    `lora` (a `llmscratch.lora.LoRASettings`): train LoRA adapters and the class head only (instead of
    `trainable`); `out` then holds the adapter with the head, to merge with `llmscratch lora merge`."""
    from llmscratch.checkpoint import load
    from llmscratch.data import labelled
    from llmscratch.runtime import autocast_dtype, resolve_device
    from llmscratch.train.batches import ExampleBatches
    from llmscratch.train.pretrain import check_out_dir, removed_on_failure
    from llmscratch.train.trainer import latest_checkpoint, train

    t0 = time.perf_counter()
    cfg = train_cfg or classify_train_config()
    out = Path(out)
    if trainable not in CLASSIFY_TRAINABLE:
        raise UserError(f"--trainable {trainable}: choose one of {', '.join(CLASSIFY_TRAINABLE)}")
    if epochs <= 0 and not max_steps:
        raise UserError(f"--epochs must be positive, got {epochs}")
    if lora is not None:
        lora.check()
        if random_init:
            raise UserError("--random-init with LoRA: adapters adapt the checkpoint's weights; drop one of them")
    if resume and latest_checkpoint(out) is None:
        raise UserError(f"--resume: no checkpoint under {out / 'checkpoints'}; start without --resume")
    replace = not resume and (out / "checkpoints").exists()
    if replace and not overwrite:
        raise UserError(f"--out {out}: already holds a training run; pass --resume to continue it, "
                        "--overwrite to replace it, or choose another folder")

    # data: read, map labels, balance, split
    examples, skipped = load_labelled(data, text_column, label_column, progress=progress)
    label_to_id = label_mapping(examples, str(data))
    labels = list(label_to_id)
    counts = class_counts(examples)
    print(f"read {len(examples):,} texts from {data}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
          + (f" ({skipped} rows with empty text skipped)" if skipped else ""), flush=True)
    if balance:
        examples = labelled.balance(examples, data_seed)
        print(f"balanced by undersampling to {len(examples) // len(labels):,} per class "
              f"({len(examples):,} texts)", flush=True)
    train_ex, val_ex, test_ex = labelled.split(examples, (0.7, 0.1), data_seed)
    if len(train_ex) < cfg.batch_size or not val_ex or not test_ex:
        raise UserError(f"{data}: {len(examples)} texts give {len(train_ex)}/{len(val_ex)}/{len(test_ex)} "
                        f"train/val/test examples; need at least one batch ({cfg.batch_size}) to train on and one "
                        "example to validate and test (add data or lower --train.batch_size)")

    # model and tokens
    base, tok = load(checkpoint)
    if random_init:
        from llmscratch.model import GPT

        torch.manual_seed(cfg.seed)
        base = GPT(base.config)
    context = base.config.context_length
    if max_length is not None and max_length <= 0:
        raise UserError(f"--max-length must be positive, got {max_length}")
    longest = max(len(tok.encode(ex.text, allowed_special="none")) for ex in examples)
    if max_length is None:
        max_length = min(longest, context)
    elif max_length > context:
        raise UserError(f"--max-length {max_length} exceeds the model's context length {context}; "
                        f"use at most {context}")
    pad = pad_token_id(tok)
    splits = {}
    n_truncated = 0
    for name, part in (("train", train_ex), ("val", val_ex), ("test", test_ex)):
        splits[name], cut = encode_examples(tok, part, label_to_id, max_length)
        n_truncated += cut
    print(f"split {len(train_ex):,} / {len(val_ex):,} / {len(test_ex):,} (train / val / test, seed {data_seed}); "
          f"max length {max_length} tokens (longest text {longest}, context {context}); "
          f"{n_truncated} text(s) truncated", flush=True)

    model = build_classifier(base, len(labels), seed=cfg.seed)
    del base
    if lora is None:
        n_trainable = set_trainable(model, trainable)
    else:  # adapters + the new class head; the base weights stay frozen
        from llmscratch.lora import apply_lora, lora_report

        apply_lora(model, lora.targets, lora.rank, lora.alpha, lora.dropout, trainable=("lm_head",), seed=cfg.seed)
        trainable, n_trainable = "lora+head", lora_report(model).trainable
        print(lora_report(model), flush=True)
    print(f"classifier: {model.num_params() / 1e6:.2f}M parameters, {n_trainable:,} trainable ({trainable}); "
          f"labels {labels}", flush=True)

    device = resolve_device(cfg.device)
    batches = ExampleBatches(splits["train"], splits["val"], lambda b: collate_labelled(b, pad, device),
                             cfg.batch_size, seed=cfg.seed)
    per_epoch = batches.batches_per_epoch
    steps = max_steps or max(1, math.ceil(epochs * per_epoch / cfg.grad_accum))
    cfg.max_steps = steps
    created = check_out_dir(out)
    if replace:  # only now that the data and the model are known to be good
        shutil.rmtree(out / "checkpoints")
    write_labels(out, labels)
    hparams = {"stage": "classify", "base": str(checkpoint), "random_init": random_init, "data": str(data),
               "classify": {"labels": labels, "text_column": text_column, "label_column": label_column,
                            "balance": balance, "split": [0.7, 0.1, 0.2], "data_seed": data_seed,
                            "max_length": max_length, "trainable": trainable, "epochs": epochs,
                            "pad_id": pad}}
    amp = autocast_dtype(cfg.precision, device)
    history: list[dict] = []
    eval_limit = max(len(splits["val"]), cfg.eval_batches * cfg.batch_size)

    def on_step(step: int, _loss) -> None:
        # Accuracy after each epoch on the whole validation split and as many training examples (a fixed
        # slice; the book's per-epoch calc_accuracy_loader), for accuracy.png.
        if step % (per_epoch // cfg.grad_accum or 1) and step != steps:
            return
        tr = evaluate_classifier(model, splits["train"], pad, len(labels), 32, device, amp, limit=eval_limit)
        va = evaluate_classifier(model, splits["val"], pad, len(labels), 32, device, amp)
        history.append({"step": step, "epoch": round(step * cfg.grad_accum / per_epoch, 2),
                        "train_accuracy": tr["accuracy"], "val_accuracy": va["accuracy"], "train_n": tr["n"]})
        if progress:
            from tqdm.auto import tqdm
            tqdm.write(f"epoch {history[-1]['epoch']:g}: train accuracy {tr['accuracy']:.1%}, "
                       f"val accuracy {va['accuracy']:.1%}")

    print(f"training {steps} steps ({steps * cfg.grad_accum / per_epoch:.3g} epochs of {per_epoch} batches of "
          f"{cfg.batch_size}) on {device.type}", flush=True)
    t_train = time.perf_counter()
    with removed_on_failure(out, created):
        result = train(model, batches, cfg, out, loss_fn=classification_loss, tokenizer=tok, resume=resume,
                       hparams=hparams, on_step=on_step, perplexity=False)
    train_s = time.perf_counter() - t_train

    metrics = {"labels": labels, "data": str(data), "base": str(checkpoint), "random_init": random_init,
               "trainable": trainable, "trainable_params": n_trainable, "steps": result.step,
               "epochs": result.step * cfg.grad_accum / per_epoch, "max_length": max_length,
               "truncated": n_truncated, "balanced": balance, "class_counts": counts,
               "stopped_early": result.stopped_early, "history": history, "splits": {}}
    for name, part in splits.items():
        metrics["splits"][name] = evaluate_classifier(model, part, pad, len(labels), 32, device, amp)
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    metrics["train_seconds"] = round(train_s, 1)
    from llmscratch.fileio import atomic_write_text

    atomic_write_text(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
    plot_confusion(metrics["splits"]["test"]["confusion"], labels, out / "confusion.png",
                   f"test split: accuracy {metrics['splits']['test']['accuracy']:.1%}")
    plot_accuracy(history, out / "accuracy.png")
    if lora is not None:
        from llmscratch.lora import finish_adapter_run

        finish_adapter_run(out, model, checkpoint, tok)
        print(f"saved the adapter and class head alone to {out}; merge before classifying: "
              f"llmscratch lora merge {out} MERGED_DIR")
    print(format_report(metrics))
    print(f"files in {out}/: model.safetensors, config.json, {LABELS_FILE}, {METRICS_FILE}, loss.png, "
          "accuracy.png, confusion.png")
    print(f'try: llmscratch classify {out} "You won a free prize! Text WIN to 80082"')
    return metrics


def format_report(metrics: dict) -> str:
    """Accuracy and loss per split, and the test confusion matrix, as printed after training."""
    lines = [f"{'split':<6} {'n':>6} {'accuracy':>9} {'loss':>7}"]
    for name, s in metrics["splits"].items():
        lines.append(f"{name:<6} {s['n']:>6} {s['accuracy']:>9.2%} {s['loss']:>7.4f}")
    labels = metrics["labels"]
    width = max(8, *(len(lab) for lab in labels))
    lines.append("test confusion matrix (rows: true, columns: predicted)")
    lines.append(" " * width + " " + " ".join(f"{lab:>{width}}" for lab in labels))
    for lab, row in zip(labels, metrics["splits"]["test"]["confusion"]):
        lines.append(f"{lab:>{width}} " + " ".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)
