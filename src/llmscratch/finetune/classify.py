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
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmscratch import runs
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
from llmscratch.finetune.defaults import CLASSIFY, CLASSIFY_TRAINABLE, classify_train_config
from llmscratch.finetune.stage import Stage, StageResult, files_message
from llmscratch.runtime import autocast_dtype
from llmscratch.train.config import TrainConfig
from llmscratch.train.metrics import save_figure, subplots

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
    from llmscratch.train.distributed import run_as_forward

    idx, lengths, labels = batch
    logits = run_as_forward(model, class_logits, idx, lengths).float()  # (through DDP's forward under torchrun)
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
    from llmscratch.train.distributed import run_as_forward

    device = torch.device(device)
    was_training = model.training
    model.eval()
    examples = examples[:limit] if limit else examples
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    total_loss = 0.0
    for start in range(0, len(examples), batch_size):
        idx, lengths, labels = collate_labelled(examples[start:start + batch_size], pad_id, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = run_as_forward(model, class_logits, idx, lengths).float()  # (a sharded model: its forward)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        pred = logits.argmax(-1)
        confusion += torch.bincount((labels * n_classes + pred).cpu(), minlength=n_classes ** 2).view(
            n_classes, n_classes)
    model.train(was_training)
    n = len(examples)
    return {"n": n, "loss": total_loss / max(n, 1), "accuracy": confusion.trace().item() / max(n, 1),
            "confusion": confusion.tolist()}


def plot_confusion(confusion: list[list[int]], labels: list[str], out_png: Path, title: str) -> Path:
    k = len(labels)
    fig, ax = subplots(figsize=(1.2 * k + 2.5, 1.2 * k + 2))
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
    return save_figure(fig, out_png)


def plot_accuracy(history: list[dict], out_png: Path) -> Path | None:
    """Train/validation accuracy after each epoch (the book's figure 6.17)."""
    if not history:
        return None
    fig, ax = subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_accuracy"] for h in history], "o-",
            label=f"train accuracy (first {history[-1]['train_n']} examples)")
    ax.plot(epochs, [h["val_accuracy"] for h in history], "s--", label="validation accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.legend()
    return save_figure(fig, out_png)


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
        """From a classifier checkpoint, a classify run folder (its newest checkpoint), or a LoRA adapter folder
        written by `finetune classify --lora-rank R` (its base and adapter merged in memory)."""
        import yaml

        from llmscratch.checkpoint import load
        from llmscratch.lora import load_merged

        if runs.is_adapter_only(path):
            folder = Path(path)
            model, tok = load_merged(folder, device=device)
        else:
            folder = runs.find_model_folder(path)
            model, tok = load(folder, device=device)
        cfg = model.config
        if not cfg.n_classes:
            raise UserError(f"{folder}: not a classifier ({runs.CONFIG} has no n_classes); fine-tune one with "
                            "`llmscratch finetune classify`")
        hp = {}
        if (folder / runs.HPARAMS).is_file():
            hp = (yaml.safe_load((folder / runs.HPARAMS).read_text()) or {}).get("classify", {}) or {}
        labels_file = runs.find_in_run(folder, runs.LABELS)
        labels = read_labels(labels_file.parent) if labels_file is not None else hp.get("labels")
        labels = labels or [str(i) for i in range(cfg.n_classes)]
        if len(labels) != cfg.n_classes:
            raise UserError(f"{folder}: {len(labels)} label names for {cfg.n_classes} classes; fix {runs.LABELS}")
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

    atomic_write_text(folder / runs.LABELS, json.dumps({lab: i for i, lab in enumerate(labels)}, indent=2) + "\n")


def read_labels(folder: Path) -> list[str]:
    """Label names in class-id order from `labels.json` ({label: id})."""
    path = Path(folder) / runs.LABELS
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read label names ({exc})") from None
    if not isinstance(mapping, dict) or sorted(mapping.values()) != list(range(len(mapping))):
        raise UserError(f"{path}: expected {{label: id}} with ids 0..n-1")
    return [label for label, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


# ---------------------------------------------------------------------------------------------------------
# the fine-tuning stage


def finetune_classify(checkpoint: str | Path, data: str, out: str | Path, *, text_column: str = CLASSIFY.text_column,
                      label_column: str = CLASSIFY.label_column, balance: bool = True, max_length: int | None = None,
                      trainable: str = CLASSIFY.trainable, epochs: float = CLASSIFY.epochs,
                      max_steps: int | None = None, data_seed: int = CLASSIFY.data_seed, random_init: bool = False,
                      train_cfg: TrainConfig | None = None, resume: bool = False, overwrite: bool = False,
                      progress: bool = True, lora=None, log=print) -> StageResult:
    """Fine-tune the model in `checkpoint` to classify the texts of `data` (see `load_labelled`); writes the
    classifier, labels.json, metrics.json, loss.png, accuracy.png and confusion.png into `out`. The result's
    `metrics` is metrics.json's content (accuracy, loss and confusion matrix per split, history...).

    `random_init` keeps only the checkpoint's shape and tokenizer and starts from fresh GPT-2-initialised
    weights: the baseline that shows what pretraining contributes (the book compares the two).

    `lora` (a `LoRASettings`): train LoRA adapters and the class head only (instead of `trainable`); `out` then
    holds the adapter with the head, which `llmscratch classify` loads as it is."""
    t0 = time.perf_counter()
    if trainable not in CLASSIFY_TRAINABLE:
        raise UserError(f"--trainable {trainable}: choose one of {', '.join(CLASSIFY_TRAINABLE)}")
    if epochs <= 0 and not max_steps:
        raise UserError(f"--epochs must be positive, got {epochs}")
    if max_steps is not None and max_steps <= 0:
        raise UserError(f"--max-steps must be positive, got {max_steps}")
    if lora is not None and random_init:
        raise UserError("--random-init with LoRA: adapters adapt the checkpoint's weights; drop one of them")
    stage = Stage("classify", checkpoint, out, train_cfg or classify_train_config(), resume=resume,
                  overwrite=overwrite, lora=lora, log=log, data=data)
    log, progress = stage.log, progress and stage.ranks.main  # under torchrun rank 0 alone speaks
    texts = stage.main_first(lambda: _read_texts(data, text_column, label_column, balance, data_seed,
                                                 stage.cfg.batch_size, progress, log))
    base, tok = stage.load_base(lm_only=False)
    if random_init:
        from llmscratch.model import GPT

        torch.manual_seed(stage.cfg.seed)
        base = GPT(base.config)
    enc = _encode_splits(texts, tok, max_length, base.config.context_length, log)
    model = build_classifier(base, len(texts.labels), seed=stage.cfg.seed)
    del base
    trainable, n_trainable = _make_trainable(stage, model, trainable)
    log(f"classifier: {model.num_params() / 1e6:.2f}M parameters, {n_trainable:,} trainable ({trainable}); "
        f"labels {texts.labels}")

    device = stage.device
    pad = pad_token_id(tok)
    batches = stage.batches(enc.splits["train"], enc.splits["val"], lambda b: collate_labelled(b, pad, device))
    per_epoch = batches.batches_per_epoch
    cfg = (stage.steps_for_epochs(None, per_epoch, max_steps=max_steps) if max_steps
           else stage.steps_for_epochs(epochs, per_epoch))
    tracker = _EpochAccuracy(model, enc.splits, pad, len(texts.labels), cfg, per_epoch, device, progress)
    hparams = {"random_init": random_init, "data": str(data),
               "classify": {"labels": texts.labels, "text_column": text_column, "label_column": label_column,
                            "balance": balance, "split": [0.7, 0.1, 0.2], "data_seed": data_seed,
                            "max_length": enc.max_length, "trainable": trainable, "epochs": epochs, "pad_id": pad}}
    log(f"training {cfg.max_steps} steps ({cfg.max_steps * cfg.grad_accum / per_epoch:.3g} epochs of {per_epoch} "
        f"batches of {cfg.batch_size}) on {device.type}")
    t_train = time.perf_counter()
    # The accuracy after each epoch is measured by rank 0 alone, which reports it — under FSDP2 by every rank
    # (the sharded model's every forward is a collective), each scoring the same examples.
    measuring = stage.ranks.main or (stage.ranks.active and cfg.strategy == "fsdp")
    result = stage.train(model, batches, cfg, tok, hparams, before=lambda o: write_labels(o, texts.labels),
                         loss_fn=classification_loss, on_step=tracker if measuring else None, perplexity=False)
    if not stage.end_training():
        return stage.result(result, *(len(enc.splits[k]) for k in ("train", "val", "test")))
    model = tracker.model = stage.trained(model)
    metrics = {"labels": texts.labels, "data": str(data), "base": str(checkpoint), "random_init": random_init,
               "trainable": trainable, "trainable_params": n_trainable, "steps": result.step,
               "epochs": result.step * cfg.grad_accum / per_epoch, "max_length": enc.max_length,
               "truncated": enc.n_truncated, "balanced": balance, "class_counts": texts.counts,
               "stopped_early": result.stopped_early, "history": tracker.history,
               "splits": {name: tracker.evaluate(part) for name, part in enc.splits.items()},
               "seconds": round(time.perf_counter() - t0, 1), "train_seconds": round(time.perf_counter() - t_train, 1)}
    _write_reports(stage.out, metrics)
    files = stage.finish(model, tok, result)
    log(format_report(metrics))
    log(files_message(stage.out, files))
    log(f'try: llmscratch classify {stage.out} "You won a free prize! Text WIN to 80082"')
    return stage.result(result, *(len(enc.splits[k]) for k in ("train", "val", "test")), metrics=metrics,
                        files=files)


@dataclass
class _Texts:
    """Labelled texts read, balanced and split 70/10/20."""

    labels: list[str]
    label_to_id: dict[str, int]
    counts: dict[str, int]
    parts: dict[str, list]  # train / val / test examples


def _read_texts(data, text_column: str, label_column: str, balance: bool, seed: int, batch_size: int, progress: bool,
                log) -> _Texts:
    from llmscratch.data import labelled

    examples, skipped = load_labelled(data, text_column, label_column, progress=progress)
    label_to_id = label_mapping(examples, str(data))
    counts = class_counts(examples)
    log(f"read {len(examples):,} texts from {data}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())
        + (f" ({skipped} rows with empty text skipped)" if skipped else ""))
    if balance:
        examples = labelled.balance(examples, seed)
        log(f"balanced by undersampling to {len(examples) // len(label_to_id):,} per class ({len(examples):,} texts)")
    train_ex, val_ex, test_ex = labelled.split(examples, (0.7, 0.1), seed)
    if len(train_ex) < batch_size or not val_ex or not test_ex:
        raise UserError(f"{data}: {len(examples)} texts give {len(train_ex)}/{len(val_ex)}/{len(test_ex)} "
                        f"train/val/test examples; need at least one batch ({batch_size}) to train on and one "
                        "example to validate and test (add data or lower --train.batch_size)")
    log(f"split {len(train_ex):,} / {len(val_ex):,} / {len(test_ex):,} (train / val / test, seed {seed})")
    return _Texts(list(label_to_id), label_to_id, counts, {"train": train_ex, "val": val_ex, "test": test_ex})


@dataclass
class _EncodedSplits:
    splits: dict[str, list[Encoded]]
    max_length: int
    n_truncated: int


def _encode_splits(texts: _Texts, tok, max_length: int | None, context: int, log) -> _EncodedSplits:
    """Token ids of every split, each text cut at `max_length` (default: the longest text, capped at the
    context length)."""
    if max_length is not None and max_length <= 0:
        raise UserError(f"--max-length must be positive, got {max_length}")
    longest = max(len(tok.encode(ex.text, allowed_special="none")) for part in texts.parts.values() for ex in part)
    if max_length is None:
        max_length = min(longest, context)
    elif max_length > context:
        raise UserError(f"--max-length {max_length} exceeds the model's context length {context}; "
                        f"use at most {context}")
    splits, n_truncated = {}, 0
    for name, part in texts.parts.items():
        splits[name], cut = encode_examples(tok, part, texts.label_to_id, max_length)
        n_truncated += cut
    log(f"max length {max_length} tokens (longest text {longest}, context {context}); "
        f"{n_truncated} text(s) truncated")
    return _EncodedSplits(splits, max_length, n_truncated)


def _make_trainable(stage: Stage, model, trainable: str) -> tuple[str, int]:
    """Freeze what `--trainable` leaves out, or with LoRA wrap the chosen layers and train them and the class
    head only; returns (what is trained, number of trainable parameters)."""
    if stage.lora is None:
        return trainable, set_trainable(model, trainable)
    from llmscratch.lora import lora_report

    stage.apply_lora(model, trainable=("lm_head",))
    return "lora+head", lora_report(model).trainable


class _EpochAccuracy:
    """The trainer's `on_step`: after each epoch (and the last step), accuracy on the whole validation split
    and as many training examples (a fixed slice; the book's per-epoch calc_accuracy_loader), for
    accuracy.png."""

    def __init__(self, model, splits, pad: int, n_classes: int, cfg: TrainConfig, per_epoch: int, device,
                 progress: bool):
        self.model, self.splits, self.pad, self.n_classes = model, splits, pad, n_classes
        self.cfg, self.per_epoch, self.device, self.progress = cfg, per_epoch, device, progress
        self.amp = autocast_dtype(cfg.precision, device)
        self.limit = max(len(splits["val"]), cfg.eval_batches * cfg.batch_size)
        self.history: list[dict] = []

    def evaluate(self, examples, limit: int | None = None) -> dict:
        return evaluate_classifier(self.model, examples, self.pad, self.n_classes, 32, self.device, self.amp,
                                   limit=limit)

    def __call__(self, step: int, _loss) -> None:
        if step % (self.per_epoch // self.cfg.grad_accum or 1) and step != self.cfg.max_steps:
            return
        tr = self.evaluate(self.splits["train"], limit=self.limit)
        va = self.evaluate(self.splits["val"])
        self.history.append({"step": step, "epoch": round(step * self.cfg.grad_accum / self.per_epoch, 2),
                             "train_accuracy": tr["accuracy"], "val_accuracy": va["accuracy"], "train_n": tr["n"]})
        if self.progress:
            from tqdm import tqdm
            tqdm.write(f"epoch {self.history[-1]['epoch']:g}: train accuracy {tr['accuracy']:.1%}, "
                       f"val accuracy {va['accuracy']:.1%}")


def _write_reports(out: Path, metrics: dict) -> None:
    """metrics.json, the test split's confusion matrix and the accuracy curve."""
    from llmscratch.fileio import atomic_write_text

    atomic_write_text(out / runs.CLASSIFY_METRICS, json.dumps(metrics, indent=2) + "\n")
    test = metrics["splits"]["test"]
    plot_confusion(test["confusion"], metrics["labels"], out / runs.CONFUSION_PLOT,
                   f"test split: accuracy {test['accuracy']:.1%}")
    plot_accuracy(metrics["history"], out / runs.ACCURACY_PLOT)


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
