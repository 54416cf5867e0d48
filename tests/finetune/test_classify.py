"""Classification fine-tuning: labelled-data loading and preparation, last-real-token pooling, the trainable
parts, training, the CLI end to end and its bad-input errors."""

import hashlib
import json
import random
import zipfile

import pytest
import torch
from clitools import assert_user_error, run

from llmscratch.checkpoint import save_model
from llmscratch.config import ModelConfig
from llmscratch.data.labelled import (
    SMS_SPAM_TSV_SHA256,
    Encoded,
    Example,
    balance,
    collate_labelled,
    encode_examples,
    label_mapping,
    load_labelled,
    pad_token_id,
    split,
)
from llmscratch.errors import UserError
from llmscratch.finetune.classify import (
    Classifier,
    build_classifier,
    class_logits,
    classification_loss,
    evaluate_classifier,
    last_token_features,
    read_labels,
    set_trainable,
    write_labels,
)
from llmscratch.model import GPT
from llmscratch.train.batches import ExampleBatches
from llmscratch.train.trainer import TrainConfig, train

SPAM_WORDS = ["win", "free", "prize", "cash", "call", "now", "claim", "urgent", "txt"]
HAM_WORDS = ["see", "you", "later", "lunch", "home", "ok", "thanks", "meeting", "love"]


def synthetic_rows(n: int = 90, seed: int = 0) -> list[tuple[str, str]]:
    """(label, text): one spam per two hams, told apart by their words, 3 to 12 words long."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        label = "spam" if i % 3 == 0 else "ham"
        words = SPAM_WORDS if label == "spam" else HAM_WORDS
        rows.append((label, " ".join(r.choice(words) for _ in range(r.randint(3, 12)))))
    return rows


@pytest.fixture(scope="module")
def tok(tmp_path_factory, tiny_corpus):
    from llmscratch.tokenizer import BPETokenizer, load_tokenizer

    folder = tmp_path_factory.mktemp("clf-tok")
    text = tiny_corpus.read_text() + "\n" + " ".join(SPAM_WORDS + HAM_WORDS) * 5
    BPETokenizer.train(text, 300, progress=False).save(folder)
    return load_tokenizer(folder)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, tok):
    """A random gpt-micro checkpoint with the tiny tokenizer (stands in for a pretrained model)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size))
    folder = tmp_path_factory.mktemp("clf-base")
    save_model(folder, model, tok)
    return folder


@pytest.fixture(scope="module")
def spam_tsv(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf-data") / "spam.tsv"
    path.write_text("".join(f"{label}\t{text}\n" for label, text in synthetic_rows()))
    return path


def micro_classifier(tok, n_classes=2, seed=0):
    torch.manual_seed(seed)
    return build_classifier(GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size)), n_classes)


# --- pooling ----------------------------------------------------------------------------------------------
def test_last_token_features_picks_each_rows_last_real_position():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    got = last_token_features(hidden, torch.tensor([2, 5]))
    assert torch.equal(got, torch.stack([hidden[0, 1], hidden[1, 4]]))


def test_padded_batch_gives_each_text_its_unpadded_logits(tok):
    model = micro_classifier(tok).eval()
    texts = ["win free cash now", "ok", "see you at home later for lunch, thanks"]
    enc = [Encoded(tok.encode(t), 0) for t in texts]
    idx, lengths, _ = collate_labelled(enc, pad_token_id(tok))
    assert idx.shape == (3, max(len(e.ids) for e in enc))
    assert (idx[1, lengths[1]:] == pad_token_id(tok)).all()
    with torch.no_grad():
        batched = class_logits(model, idx, lengths)
        alone = torch.cat([model.lm_head(model.features(torch.tensor([e.ids]))[:, -1]) for e in enc])
        at_minus_one = model.lm_head(model.features(idx)[:, -1])
    torch.testing.assert_close(batched, alone)
    # Reading position -1 instead would read a pad token for every text shorter than the longest.
    assert not torch.allclose(at_minus_one[0], alone[0], atol=1e-4)
    torch.testing.assert_close(at_minus_one[2], alone[2])


def test_pad_id_is_the_tokenizers_end_of_text(tok):
    assert pad_token_id(tok) == tok.special_tokens["<|endoftext|>"]


# --- labels -----------------------------------------------------------------------------------------------
def test_label_mapping_is_sorted_and_round_trips_through_labels_json(tmp_path):
    examples = [Example("a", "spam"), Example("b", "ham"), Example("c", "eggs"), Example("d", "ham")]
    mapping = label_mapping(examples)
    assert mapping == {"eggs": 0, "ham": 1, "spam": 2}
    write_labels(tmp_path, list(mapping))
    assert json.loads((tmp_path / "labels.json").read_text()) == mapping
    assert read_labels(tmp_path) == ["eggs", "ham", "spam"]


def test_one_class_only_is_a_user_error():
    with pytest.raises(UserError, match="only one class"):
        label_mapping([Example("a", "ham"), Example("b", "ham")], "x.tsv")


# --- loading ----------------------------------------------------------------------------------------------
def test_headerless_tsv_is_label_tab_text_and_quotes_are_text(tmp_path):
    path = tmp_path / "sms.tsv"
    path.write_text('ham\tGo until "jurong point\nspam\tFree entry\twith a tab\n\nham\t  \n')
    examples, skipped = load_labelled(path)
    assert [(e.label, e.text) for e in examples] == [("ham", 'Go until "jurong point'),
                                                    ("spam", "Free entry\twith a tab")]
    assert skipped == 1  # the blank text on line 4
    assert examples[1].where.endswith("sms.tsv:2")


def test_tsv_and_csv_with_header_and_custom_columns(tmp_path):
    (tmp_path / "a.tsv").write_text("id\tcategory\tbody\n1\tpos\tgreat film\n2\tneg\tdull\n")
    examples, _ = load_labelled(tmp_path / "a.tsv", text_column="body", label_column="category")
    assert [(e.text, e.label) for e in examples] == [("great film", "pos"), ("dull", "neg")]
    (tmp_path / "b.csv").write_text('text,label\n"hello, world",greet\n"two\nlines ""quoted""",other\n')
    examples, _ = load_labelled(tmp_path / "b.csv")
    assert [(e.text, e.label) for e in examples] == [("hello, world", "greet"), ('two\nlines "quoted"', "other")]
    (tmp_path / "c.csv").write_text("spam,win now\nham,see you\n")  # headerless: label,text
    examples, _ = load_labelled(tmp_path / "c.csv")
    assert [(e.label, e.text) for e in examples] == [("spam", "win now"), ("ham", "see you")]


def test_jsonl_and_json_array(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "win", "label": 1}\n\n{"text": "hi", "label": 0, "x": 2}\n')
    examples, _ = load_labelled(tmp_path / "d.jsonl")
    assert [(e.text, e.label) for e in examples] == [("win", "1"), ("hi", "0")]
    (tmp_path / "e.json").write_text(json.dumps([{"sms": "win", "y": "spam"}, {"sms": "hi", "y": "ham"}]))
    examples, _ = load_labelled(tmp_path / "e.json", text_column="sms", label_column="y")
    assert [(e.text, e.label) for e in examples] == [("win", "spam"), ("hi", "ham")]


@pytest.mark.parametrize("name, content, needles", [
    ("bad.csv", 'text,label\n"unclosed,ham\nok,spam\n', ["bad.csv:", "malformed CSV"]),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n', ["bad.jsonl:2", "not valid JSON"]),
    ("bad.json", '[{"text": "a", "label": "x"},\n {"text": }]', ["bad.json:2", "not valid JSON"]),
    ("keys.jsonl", '{"text": "a", "label": "x"}\n{"body": "b", "label": "y"}\n',
     ["keys.jsonl:2", "no key 'text'", "--text-column"]),
    ("cols.csv", "text,category\nhi,a\n", ["cols.csv:1", "no column 'label'", "--label-column"]),
    ("three.tsv", "a\tb\tc\n", ["three.tsv:1", "no header row", "3 field(s)"]),
    ("short.tsv", "text\tlabel\nhello\n", ["short.tsv:2", "1 field(s)"]),
    ("nolabel.tsv", "ham\thello\n\tworld\n", ["nolabel.tsv:2", "empty label"]),
    ("empty.tsv", "\n  \n", ["empty.tsv", "file is empty"]),
    ("data.xml", "<a/>", ["data.xml", "unknown format"]),
    ("obj.jsonl", '["a", "b"]\n', ["obj.jsonl:1", "expected a JSON object"]),
])
def test_bad_files_name_the_file_and_line(tmp_path, name, content, needles):
    (tmp_path / name).write_text(content)
    with pytest.raises(UserError) as info:
        load_labelled(tmp_path / name)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_labelled(tmp_path / "nope.tsv")


def test_sms_spam_source_reads_the_cached_zip(tmp_path, monkeypatch, shared_data):
    tsv = shared_data / "SMSSpamCollection.tsv"
    if not tsv.is_file():
        pytest.skip(f"{tsv} is absent (real data lives in ../shared/data)")
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(cache))
    (cache / "sms-spam").mkdir(parents=True)
    with zipfile.ZipFile(cache / "sms-spam" / "sms+spam+collection.zip", "w") as zf:
        zf.writestr("readme", "the UCI readme")
        zf.writestr("SMSSpamCollection", tsv.read_bytes())
    examples, skipped = load_labelled("sms-spam", progress=False)  # found in the cache: no network
    assert len(examples) == 5574 and skipped == 0
    extracted = cache / "sms-spam" / "SMSSpamCollection.tsv"
    assert hashlib.sha256(extracted.read_bytes()).hexdigest() == SMS_SPAM_TSV_SHA256


def test_sms_spam_zip_with_other_content_is_refused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(cache))
    (cache / "sms-spam").mkdir(parents=True)
    archive = cache / "sms-spam" / "sms+spam+collection.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("SMSSpamCollection", "ham\tchanged upstream\n")
    with pytest.raises(UserError, match="sha256"):
        load_labelled("sms-spam", progress=False)
    assert not archive.exists()  # not reused next time


# --- preparing --------------------------------------------------------------------------------------------
def test_balance_undersamples_to_the_smallest_class_and_split_is_70_10_20():
    examples = [Example(f"t{i}", "a" if i < 30 else "b") for i in range(40)]
    balanced = balance(examples, seed=1)
    assert sorted(e.label for e in balanced).count("a") == 10 and len(balanced) == 20
    assert all(e.label == "b" for e in balanced if e.text in {f"t{i}" for i in range(30, 40)})
    assert balance(examples, seed=1) == balanced and balance(examples, seed=2) != balanced
    train_ex, val_ex, test_ex = split(balanced, seed=5)
    assert (len(train_ex), len(val_ex), len(test_ex)) == (14, 2, 4)
    assert sorted(e.text for e in train_ex + val_ex + test_ex) == sorted(e.text for e in balanced)
    assert split(balanced, seed=5) == (train_ex, val_ex, test_ex)


def test_sms_spam_real_data_counts_as_in_the_book(shared_data):
    tsv = shared_data / "SMSSpamCollection.tsv"
    if not tsv.is_file():
        pytest.skip(f"{tsv} is absent (real data lives in ../shared/data)")
    examples, _ = load_labelled(tsv)
    assert label_mapping(examples) == {"ham": 0, "spam": 1}
    assert sum(e.label == "spam" for e in examples) == 747 and len(examples) == 5574
    parts = split(balance(examples, 123), seed=123)
    assert [len(p) for p in parts] == [1045, 149, 300]  # the book's chapter-6 split sizes


def test_truncation_cuts_to_max_length_and_counts(tok):
    examples = [Example("win free cash now " * 5, "spam"), Example("ok", "ham")]
    encoded, truncated = encode_examples(tok, examples, {"ham": 0, "spam": 1}, max_length=6)
    assert truncated == 1
    assert encoded[0].ids == tok.encode("win free cash now " * 5)[:6] and encoded[0].label == 1
    assert encoded[1].ids == tok.encode("ok") and encoded[1].label == 0
    # special-token strings inside a text are plain text, never the end-of-text id
    ids = encode_examples(tok, [Example("<|endoftext|>", "ham")], {"ham": 0}, 64)[0][0].ids
    assert tok.special_tokens["<|endoftext|>"] not in ids


# --- the model ----------------------------------------------------------------------------------------------
def test_build_classifier_keeps_the_body_and_adds_a_class_head(tok):
    torch.manual_seed(0)
    base = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size))
    clf = build_classifier(base, 3)
    assert clf.config.n_classes == 3 and not clf.config.tie_embeddings
    assert clf.lm_head.weight.shape == (3, base.config.d_model)
    assert 0.01 < clf.lm_head.weight.std().item() < 0.04  # GPT-2 init, std 0.02
    for name, p in base.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(clf.state_dict()[name], p), name


@pytest.mark.parametrize("which", ["head", "last-block", "all"])
def test_training_lowers_the_loss_and_changes_only_the_chosen_parts(tok, tmp_path, which):
    model = micro_classifier(tok)
    n_trainable = set_trainable(model, which)
    trained_prefixes = {"head": ("lm_head.",), "last-block": ("lm_head.", "norm.", "blocks.1."),
                        "all": ("",)}[which]
    expected = {n for n, _ in model.named_parameters() if n.startswith(trained_prefixes)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)

    rows = synthetic_rows(32)
    data, _ = encode_examples(tok, [Example(t, lab) for lab, t in rows], {"ham": 0, "spam": 1}, 64)
    pad = pad_token_id(tok)
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = evaluate_classifier(model, data, pad, 2)
    cfg = TrainConfig(max_steps=25, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=25, eval_batches=1,
                      save_every=25, progress=False, device="cpu", precision="fp32")
    train(model, ExampleBatches(data, data, lambda b: collate_labelled(b, pad), 8, seed=0), cfg, tmp_path,
          loss_fn=classification_loss, tokenizer=tok)
    after = evaluate_classifier(model, data, pad, 2)
    assert after["loss"] < before["loss"] * 0.7, (before, after)
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before_params[name])
        assert changed == (name in expected), name


def test_classification_loss_is_cross_entropy_at_the_last_real_token_with_accuracy(tok):
    model = micro_classifier(tok).eval()
    data = [Encoded(tok.encode(t), lab) for t, lab in [("win cash now", 1), ("ok", 0), ("see you", 0)]]
    batch = collate_labelled(data, pad_token_id(tok))
    with torch.no_grad():
        loss, n, extras = classification_loss(model, batch)
        logits = torch.cat([model.lm_head(model.features(torch.tensor([e.ids]))[:, -1]) for e in data])
    labels = torch.tensor([1, 0, 0])
    assert n == 3
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    assert extras["accuracy"].item() == pytest.approx((logits.argmax(-1) == labels).float().mean().item())


def test_evaluate_classifier_confusion_matrix_counts(tok):
    model = micro_classifier(tok)
    data = [Encoded(tok.encode(t), lab) for t, lab in [("win", 1), ("ok", 0), ("see you", 0), ("cash", 1)]]
    result = evaluate_classifier(model, data, pad_token_id(tok), 2, batch_size=3)
    conf = torch.tensor(result["confusion"])
    assert conf.sum() == 4 and conf[0].sum() == 2 and conf[1].sum() == 2
    assert result["accuracy"] == pytest.approx(conf.trace().item() / 4)
    idx, lengths, labels = collate_labelled(data, pad_token_id(tok))
    with torch.no_grad():
        pred = class_logits(model.eval(), idx, lengths).argmax(-1)
    assert result["accuracy"] == pytest.approx((pred == labels).float().mean().item())


# --- CLI --------------------------------------------------------------------------------------------------
FAST = ["--epochs", 4, "--train.lr", 3e-3, "--train.warmup_steps", 2, "--train.eval_every", 5,
        "--train.eval_batches", 1, "--no-progress", "--trainable", "all"]


def test_finetune_classify_then_classify_end_to_end(base_ckpt, spam_tsv, tmp_path, capsys):
    out = tmp_path / "clf"
    code, stdout, err = run(["finetune", "classify", base_ckpt, "--data", spam_tsv, "--out", out, *FAST], capsys)
    assert code == 0, err
    for name in ("model.safetensors", "config.json", "tokenizer.json", "labels.json", "metrics.json",
                 "hyperparameters.yaml", "loss.png", "accuracy.png", "confusion.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["ham", "spam"] and metrics["balanced"]
    assert {s: metrics["splits"][s]["n"] for s in ("train", "val", "test")} == {"train": 42, "val": 6, "test": 12}
    assert sum(map(sum, metrics["splits"]["test"]["confusion"])) == 12
    assert len(metrics["history"]) == 4  # accuracy after each epoch
    import csv

    with open(out / "metrics.csv", newline="") as f:
        evals = [r for r in csv.DictReader(f) if r["kind"] == "eval"]
    assert evals and all(0.0 <= float(r["val_accuracy"]) <= 1.0 for r in evals)  # the loss's extra scalar
    assert "test confusion matrix" in stdout and "0 text(s) truncated" in stdout
    assert ModelConfig.load(out / "config.json").n_classes == 2

    code, stdout, err = run(["classify", out, "win free cash prize now", "see you at home for lunch"], capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 2
    for line, text in zip(lines, ["win free cash prize now", "see you at home for lunch"]):
        label, prob, echoed = line.split("\t")
        assert label in ("ham", "spam") and 0.5 <= float(prob) <= 1.0 and echoed == text
    clf = Classifier.load(out)
    assert clf.labels == ["ham", "spam"] and clf.max_length == metrics["max_length"]

    # the run folder is protected; --overwrite replaces it
    code, _, err = run(["finetune", "classify", base_ckpt, "--data", spam_tsv, "--out", out, *FAST], capsys)
    assert_user_error(code, err, "already holds a training run", "--overwrite")


def test_finetune_classify_resume_continues(base_ckpt, spam_tsv, tmp_path, capsys):
    out = tmp_path / "clf"
    args = ["finetune", "classify", base_ckpt, "--data", spam_tsv, "--out", out, *FAST,
            "--train.save_every", 5]
    assert run([*args, "--max-steps", 5], capsys)[0] == 0
    code, stdout, err = run([*args, "--max-steps", 10, "--resume"], capsys)
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 10


def test_classify_reads_label_names_from_a_step_checkpoint(base_ckpt, spam_tsv, tmp_path, capsys):
    out = tmp_path / "clf"
    args = ["finetune", "classify", base_ckpt, "--data", spam_tsv, "--out", out, *FAST, "--max-steps", 3]
    assert run(args, capsys)[0] == 0
    step = next((out / "checkpoints").iterdir())
    assert not (step / "labels.json").exists()
    assert Classifier.load(step).labels == ["ham", "spam"]  # from hyperparameters.yaml


def test_cli_bad_input_exits_2_with_one_line(base_ckpt, spam_tsv, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{oops}\n')
    code, _, err = run(["finetune", "classify", base_ckpt, "--data", bad, "--out", tmp_path / "o"], capsys)
    assert_user_error(code, err, "bad.jsonl:2")
    assert not (tmp_path / "o").exists()  # nothing half-written

    one = tmp_path / "one.tsv"
    one.write_text("ham\thello\nham\tworld\n")
    code, _, err = run(["finetune", "classify", base_ckpt, "--data", one, "--out", tmp_path / "o"], capsys)
    assert_user_error(code, err, "only one class")

    code, _, err = run(["finetune", "classify", base_ckpt, "--data", spam_tsv, "--out", tmp_path / "o",
                        "--trainable", "middle"], capsys)
    assert_user_error(code, err, "--trainable middle")

    code, _, err = run(["finetune", "classify", base_ckpt, "--data", spam_tsv, "--out", tmp_path / "o",
                        "--max-length", 500], capsys)
    assert_user_error(code, err, "--max-length 500", "context length 64")

    code, _, err = run(["classify", base_ckpt, "some text"], capsys)
    assert_user_error(code, err, "not a classifier", "n_classes")
    assert not (tmp_path / "o").exists()


def test_random_init_keeps_shape_and_tokenizer_but_not_weights(base_ckpt, spam_tsv, tmp_path, capsys):
    from llmscratch.checkpoint import load_model

    out = tmp_path / "scratch"
    code, _, err = run(["finetune", "classify", base_ckpt, "--data", spam_tsv, "--out", out, *FAST,
                        "--max-steps", 1, "--trainable", "head", "--random-init"], capsys)
    assert code == 0, err
    base, clf = load_model(base_ckpt), load_model(out)
    assert clf.config.replace(n_classes=None, tie_embeddings=True) == base.config
    assert not torch.equal(clf.tok_emb.weight, base.tok_emb.weight)  # frozen, so still the fresh init
    assert json.loads((out / "metrics.json").read_text())["random_init"] is True
