"""LoRA: the layer's math (init == base, merge == unmerged, unmerge exact), the module swap and its targets, only
adapters train, adapter folders (only LoRA tensors, base check, merge), PEFT round trip against transformers,
resume, and the --lora-* flags of `finetune instruct` / `finetune classify` end to end."""

import json

import pytest
import torch
import torch.nn.functional as F
from clitools import Crash, assert_user_error, crash_at, run
from safetensors.torch import load_file

from llmscratch.checkpoint import load_model, save_model
from llmscratch.config import ModelConfig
from llmscratch.errors import UserError
from llmscratch.lora import (
    LoRAApplied,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_disabled,
    lora_layers,
    lora_report,
    lora_state_dict,
    merge_adapter_folder,
    merge_lora,
    resolve_targets,
    save_adapter,
    target_suffixes,
)
from llmscratch.model import GPT
from llmscratch.weights.peft import export_peft


def micro(preset="gpt-micro", seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_preset(preset, **kw)).eval()


def randomize_adapters(model, seed=1, std=0.05):
    """Non-zero B (a trained adapter) so merged/unmerged and export comparisons are not trivially equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def ids(batch=2, T=12, vocab=512, seed=0):
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tok():
    from llmscratch.tokenizer import BPETokenizer

    return BPETokenizer.train(["bytes"], 257, progress=False)  # 256 bytes + <|endoftext|>


# --- the layer ---------------------------------------------------------------------------------------------
def test_layer_init_kaiming_a_zero_b_and_scale():
    base = torch.nn.Linear(32, 48)
    layer = LoRALinear(base, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (48, 4)
    assert torch.count_nonzero(layer.lora_B) == 0 and layer.scale == 2.0
    bound = 1 / 32 ** 0.5  # kaiming_uniform(a=√5) on fan_in 32, as nn.Linear's own weight init
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = base(x) + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.weight, base.weight + 2.0 * layer.lora_B @ layer.lora_A)


@pytest.mark.parametrize("preset", ["gpt-micro", "llama-micro"])
def test_lora_at_init_gives_exactly_the_base_outputs(preset):
    model = micro(preset, tie_embeddings=False)
    x, y = ids(), ids(seed=1)
    logits, loss = model(x), model(x, targets=y)
    apply_lora(model, "all", rank=4, alpha=16)
    assert len(lora_layers(model)) == 2 * (4 if preset == "gpt-micro" else 5) + 1  # + the untied head
    assert torch.equal(model(x), logits)
    assert torch.equal(model(x, targets=y), loss)  # the fused LM-head loss reads lm_head.weight


def test_head_adapter_reaches_the_fused_loss():
    model = micro(tie_embeddings=False)
    apply_lora(model, "head", rank=2, alpha=2)
    randomize_adapters(model)
    x, y = ids(), ids(seed=1)
    expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    torch.testing.assert_close(model(x, targets=y), expected)


@pytest.mark.parametrize("preset", ["gpt-micro", "llama-micro"])
def test_merged_equals_unmerged_and_unmerge_restores_the_base_exactly(preset):
    model = micro(preset, tie_embeddings=False)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    apply_lora(model, "all", rank=4, alpha=8, dropout=0.1)
    randomize_adapters(model)
    x = ids()
    unmerged = model(x)
    for _, layer in lora_layers(model):
        layer.merge()
    merged = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.equal(merged, micro(preset, tie_embeddings=False)(x))  # the adapters did change the model
    for _, layer in lora_layers(model):
        layer.unmerge()
    for name, layer in lora_layers(model):
        assert torch.equal(layer.base.weight, originals[name]), name
    assert torch.equal(model(x), unmerged)
    # merge_lora leaves a plain GPT with the same function
    plain = merge_lora(model)
    assert not lora_layers(plain) and all(type(m) is torch.nn.Linear for n, m in plain.named_modules()
                                           if n.endswith(("qkv", "proj", "fc", "gate", "up", "lm_head")))
    torch.testing.assert_close(plain(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset, expected", [
    ("qwen3-moe-micro", {"attn.qkv", "attn.proj", "mlp.experts.0.gate", "mlp.experts.7.proj"}),
    ("mla-micro", {"attn.q_proj", "attn.kv_down", "attn.kv_up", "attn.proj"})])
def test_the_groups_reach_the_experts_and_the_latent_attention(preset, expected):
    """`all` wraps every expert of a mixture (and nothing of its router) and every projection of multi-head latent
    attention; merged equals unmerged there too."""
    model = micro(preset, tie_embeddings=False)
    names = apply_lora(model, "all", rank=4, alpha=8).modules
    suffixes = {n.split(".", 2)[2] for n in names if n.startswith("blocks.0.")}
    assert expected <= suffixes and not any("router" in n for n in names)
    if preset == "qwen3-moe-micro":
        assert sum(".experts." in n for n in names) == 2 * 8 * 3  # 2 blocks × 8 experts × gate, up, down
    # What an adapter folder records (block-independent names) selects the same layers again when it is loaded
    assert resolve_targets(micro(preset, tie_embeddings=False), target_suffixes(names)) == list(names)
    randomize_adapters(model)
    x = ids()
    unmerged = model(x)
    torch.testing.assert_close(merge_lora(model)(x), unmerged, rtol=1e-5, atol=1e-5)


def test_disabled_adapters_give_the_base_outputs():
    model = micro()
    base_logits = model(ids())
    apply_lora(model, "attn", rank=4, alpha=8)
    randomize_adapters(model)
    adapted = model(ids())
    with lora_disabled(model):
        assert torch.equal(model(ids()), base_logits)
    assert torch.equal(model(ids()), adapted)


# --- targets and the report --------------------------------------------------------------------------------
def test_target_names_select_modules():
    gpt, llama = micro(), micro("llama-micro", tie_embeddings=False)
    assert resolve_targets(gpt, "qkv") == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert resolve_targets(gpt, "out,down") == ["blocks.0.attn.proj", "blocks.0.mlp.proj", "blocks.1.attn.proj",
                                                "blocks.1.mlp.proj"]
    assert resolve_targets(gpt, "proj") == resolve_targets(gpt, "out,down")
    assert resolve_targets(gpt, "mlp") == resolve_targets(gpt, "fc,down")
    assert resolve_targets(gpt, "attn.proj") == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    assert "lm_head" not in resolve_targets(gpt, "all")  # tied head: left out of the group
    assert resolve_targets(llama, "gate,up") == ["blocks.0.mlp.gate", "blocks.0.mlp.up", "blocks.1.mlp.gate",
                                                 "blocks.1.mlp.up"]
    assert resolve_targets(llama, "all")[-1] == "lm_head"
    assert "lm_head" not in resolve_targets(llama, "all", exclude=("lm_head",))


@pytest.mark.parametrize("targets, needle", [("head", "tied to the token embedding"), ("gate", "matches no linear"),
                                             ("qkv,bogus", "'bogus' matches no linear"), (" , ", "empty")])
def test_bad_targets_are_user_errors(targets, needle):
    with pytest.raises(UserError, match=needle):
        resolve_targets(micro(), targets)


def test_bad_rank_alpha_dropout_are_user_errors():
    for kw, needle in ((dict(rank=0), "--lora-rank"), (dict(alpha=-1), "--lora-alpha"),
                       (dict(dropout=1.0), "--lora-dropout")):
        with pytest.raises(UserError, match=needle):
            apply_lora(micro(), "all", **{"rank": 4, "alpha": 8, **kw})


def test_apply_lora_returns_what_it_applied_and_attaches_nothing_else():
    model = micro(tie_embeddings=False)
    before = set(vars(model))
    applied = apply_lora(model, "attn", rank=4, alpha=8, dropout=0.1, trainable=("lm_head",))
    assert applied == LoRAApplied(("blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.1.attn.qkv",
                                   "blocks.1.attn.proj"), 4, 8.0, 0.1, ("lm_head",))
    assert applied.targets == ["attn.qkv", "attn.proj"]
    assert set(vars(model)) == before  # read back from the layers: LoRAApplied.of(model) is the same
    assert LoRAApplied.of(model, ("lm_head",)) == applied
    assert lora_report(model).extra_trainable == ["lm_head"]
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, "mlp")
    merge_lora(model)
    with pytest.raises(ValueError, match="no LoRA layers"):
        LoRAApplied.of(model)


def test_report_counts_trainable_and_total_parameters():
    model = micro()
    total_before = model.num_params()
    apply_lora(model, "qkv", rank=4, alpha=8)
    r = lora_report(model)
    # qkv: 64 → 192 in each of 2 blocks: A (4, 64) + B (192, 4)
    assert r.lora_params == 2 * (4 * 64 + 192 * 4) == r.trainable
    assert r.total == total_before + r.lora_params
    assert r.fraction == pytest.approx(r.trainable / r.total)
    assert "rank 4" in str(r) and f"{r.trainable:,} trainable of {r.total:,}" in str(r)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"blocks.{i}.attn.qkv.lora_{ab}" for i in range(2) for ab in "AB"]


# --- training ----------------------------------------------------------------------------------------------
class RandomLM:
    """A tiny BatchSource of random (x, y) token batches."""

    def __init__(self, vocab=512, T=16, B=4):
        from llmscratch.train.batches import ExampleBatches

        g = torch.Generator().manual_seed(0)
        seqs = [torch.randint(0, vocab, (T + 1,), generator=g) for _ in range(32)]
        self.inner = ExampleBatches(seqs, seqs[:8], lambda b: (torch.stack([s[:-1] for s in b]),
                                                               torch.stack([s[1:] for s in b])), B, seed=0)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def train_cfg(**kw):
    from llmscratch.train.trainer import TrainConfig

    base = dict(max_steps=6, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=3, eval_batches=1, log_every=1,
                save_every=3, keep_last=3, progress=False, device="cpu", precision="fp32")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("trainable", [(), ("lm_head",)])
def test_only_lora_parameters_and_an_explicit_head_change(tmp_path, trainable):
    from llmscratch.train.trainer import train

    model = micro(tie_embeddings=False)
    apply_lora(model, "attn,mlp", rank=4, alpha=8, trainable=trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, RandomLM(), train_cfg(), tmp_path)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if k.endswith(("lora_A", "lora_B"))} | {k for k in before if k.startswith(trainable)}
    assert changed == expected


def test_resume_restores_lora_parameters_exactly(tmp_path):
    from llmscratch.train.trainer import train

    def fresh():
        model = micro(tie_embeddings=False)
        apply_lora(model, "all", rank=4, alpha=8, dropout=0.1)
        return model

    straight = fresh()
    train(straight, RandomLM(), train_cfg(), tmp_path / "a")
    with pytest.raises(Crash):
        # (crashing after the step-3 checkpoint)
        train(fresh(), RandomLM(), train_cfg(), tmp_path / "b", on_step=crash_at(5))
    resumed = fresh()  # a fresh process: base + new adapters, then the checkpoint's full state
    train(resumed, RandomLM(), train_cfg(), tmp_path / "b", resume=True)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


# --- adapter folders -----------------------------------------------------------------------------------------
@pytest.fixture()
def adapted(tmp_path, tok):
    """(base folder, adapter folder, adapted model): a gpt-micro base and a trained-looking adapter."""
    base = micro(tie_embeddings=False, vocab_size=tok.vocab_size)
    base_dir = save_model(tmp_path / "base", base, tok)
    model = load_model(base_dir)
    apply_lora(model, "all", rank=4, alpha=8)
    randomize_adapters(model)
    save_adapter(tmp_path / "adapter", model, base_dir, tok, {"stage": "test"})
    return base_dir, tmp_path / "adapter", model


def test_adapter_file_holds_only_lora_tensors(adapted):
    _, folder, model = adapted
    tensors = load_file(str(folder / "adapter.safetensors"))
    assert set(tensors) == {f"{n}.lora_{ab}" for n, _ in lora_layers(model) for ab in "AB"}
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["rank"] == 4 and cfg["alpha"] == 8 and cfg["targets"] == ["attn.qkv", "attn.proj", "mlp.fc",
                                                                        "mlp.proj", "lm_head"]
    assert len(cfg["base"]["sha256"]) == 64 and cfg["base"]["path"].endswith("base")
    assert (folder / "tokenizer.json").is_file()
    size = (folder / "adapter.safetensors").stat().st_size
    assert size < (adapted[0] / "model.safetensors").stat().st_size / 3


def test_load_adapter_and_merge_folder_reproduce_the_adapted_model(adapted, tmp_path):
    base_dir, folder, model = adapted
    x = ids(vocab=257)
    reloaded, tok, _ = load_adapter(folder)
    assert torch.equal(reloaded(x), model(x))
    merged_dir = merge_adapter_folder(folder, tmp_path / "merged")
    merged = load_model(merged_dir)
    torch.testing.assert_close(merged(x), model(x), rtol=1e-5, atol=1e-5)
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "hyperparameters.yaml").is_file()


def test_adapter_of_a_classifier_keeps_its_head(tmp_path, tok):
    from llmscratch.finetune.classify import build_classifier

    base_dir = save_model(tmp_path / "base", micro(vocab_size=tok.vocab_size), tok)
    clf = build_classifier(load_model(base_dir), 3)
    apply_lora(clf, "all", rank=2, alpha=4, trainable=("lm_head",))
    randomize_adapters(clf)
    save_adapter(tmp_path / "adapter", clf, base_dir, tok, trainable=("lm_head",))
    assert set(load_file(str(tmp_path / "adapter" / "adapter.safetensors"))) == (
        {f"{n}.lora_{ab}" for n, _ in lora_layers(clf) for ab in "AB"} | {"lm_head.weight"})
    reloaded, _, _ = load_adapter(tmp_path / "adapter")
    x = ids(vocab=257)
    assert reloaded.config.n_classes == 3 and torch.equal(reloaded.features(x), clf.features(x))
    assert torch.equal(reloaded.lm_head.weight, clf.lm_head.weight)


def test_changed_base_or_foreign_folder_is_a_user_error(adapted, tmp_path, tok):
    base_dir, folder, _ = adapted
    other = save_model(tmp_path / "other", micro(seed=5, tie_embeddings=False, vocab_size=tok.vocab_size), tok)
    with pytest.raises(UserError, match="not the weights this adapter was trained on"):
        load_adapter(folder, base=other)
    with pytest.raises(UserError, match="no adapter_config.json"):
        load_adapter(base_dir)
    from llmscratch.checkpoint import find_model_folder

    with pytest.raises(UserError, match="a LoRA adapter, not a full checkpoint.*lora merge"):
        find_model_folder(folder)


# --- Hugging Face PEFT ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["gpt-micro", "llama-micro", "qwen3-micro"])
def test_peft_loads_our_export_onto_the_transformers_model_with_equal_logits(tmp_path, tok, preset):
    pytest.importorskip("peft", reason="peft is in the test extra")
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")
    from peft import PeftModel

    from llmscratch.weights.hf_gpt2 import export_hf_gpt2
    from llmscratch.weights.hf_llama import export_hf_llama

    base = micro(preset, tie_embeddings=False, vocab_size=tok.vocab_size)
    base_dir = save_model(tmp_path / "base", base, tok)
    model = load_model(base_dir)
    apply_lora(model, "all", rank=4, alpha=8)
    randomize_adapters(model)
    save_adapter(tmp_path / "adapter", model, base_dir, tok)
    if preset == "gpt-micro":
        export_hf_gpt2(base, tmp_path / "hf", tok)
    else:
        export_hf_llama(base, tmp_path / "hf")
    export_peft(tmp_path / "adapter", tmp_path / "peft", base_hf=str(tmp_path / "hf"))
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == 8
    assert peft_cfg["fan_in_fan_out"] == (preset == "gpt-micro")

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    x = ids(vocab=tok.vocab_size)
    with torch.no_grad():
        theirs, ours = peft_model(x).logits, model(x)
        with peft_model.disable_adapter():
            assert (peft_model(x).logits - ours).abs().max() > 1e-3  # the adapter matters
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_peft_export_refuses_an_adapter_with_a_class_head(tmp_path, tok):
    from llmscratch.finetune.classify import build_classifier

    base_dir = save_model(tmp_path / "base", micro(vocab_size=tok.vocab_size), tok)
    clf = build_classifier(load_model(base_dir), 2)
    apply_lora(clf, "qkv", rank=2, alpha=4, trainable=("lm_head",))
    save_adapter(tmp_path / "adapter", clf, base_dir, tok, trainable=("lm_head",))
    with pytest.raises(UserError, match="lora merge"):
        export_peft(tmp_path / "adapter", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_lora_state_dict_needs_adapters():
    with pytest.raises(ValueError):
        lora_state_dict(micro())


# --- CLI ---------------------------------------------------------------------------------------------------
RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "blue"},
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
    {"instruction": "Say bye.", "input": "", "output": "bye"},
]


@pytest.fixture(scope="module")
def cli_base(tmp_path_factory, tok):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("gpt-micro", vocab_size=tok.vocab_size, context_length=256))
    return save_model(tmp_path_factory.mktemp("lora-base") / "micro", model, tok)


def test_finetune_instruct_with_lora_then_generate_merge_and_resume(cli_base, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 5))
    out = tmp_path / "adapter"
    args = ["finetune", "instruct", cli_base, "--data", data, "--out", out, "--epochs", 0, "--train.batch_size", 2,
            "--train.eval_every", 2, "--train.eval_batches", 1, "--train.warmup_steps", 1, "--train.lr", 1e-2,
            "--train.save_every", 2, "--max-new-tokens", 4, "--no-progress",
            "--lora-rank", 4, "--lora-alpha", 8, "--lora-targets", "qkv,fc"]
    code, stdout, err = run([*args, "--train.max_steps", 2], capsys)
    assert code == 0, err
    assert "LoRA rank 4, alpha 8 on 4 layers (attn.qkv, mlp.fc)" in stdout and "trainable of" in stdout
    for name in ("adapter.safetensors", "adapter_config.json", "tokenizer.json", "prompt_style.json",
                 "hyperparameters.yaml", "test_responses.json"):
        assert (out / name).is_file(), name
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    code, stdout, err = run([*args, "--train.max_steps", 4, "--resume"], capsys)
    assert code == 0, err
    assert "stopped at step 4" in stdout
    adapter = load_file(str(out / "adapter.safetensors"))
    assert len(adapter) == 8 and all(k.endswith(("lora_A", "lora_B")) for k in adapter)
    assert any(torch.count_nonzero(v) for k, v in adapter.items() if k.endswith("lora_B"))  # it trained

    ask = ["--prompt", "Say hi.", "--temperature", 0, "--max-new-tokens", 8]
    code, from_adapter, err = run(["generate", out, *ask], capsys)
    assert code == 0, err
    code, _, err = run(["lora", "merge", out, tmp_path / "merged"], capsys)
    assert code == 0, err
    assert (tmp_path / "merged" / "prompt_style.json").is_file()
    code, from_merged, err = run(["generate", tmp_path / "merged", *ask], capsys)
    assert code == 0, err
    assert from_merged == from_adapter

    code, _, err = run(["eval", "tasks", out, data], capsys)  # elsewhere an adapter must be merged first
    assert_user_error(code, err, "a LoRA adapter", "lora merge")


def test_finetune_classify_with_lora_keeps_the_head_and_classifies_after_merge(cli_base, tmp_path, capsys):
    rows = [("spam", "win free cash prize now"), ("ham", "see you at lunch today")] * 20
    data = tmp_path / "spam.tsv"
    data.write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    out = tmp_path / "clf"
    code, stdout, err = run(["finetune", "classify", cli_base, "--data", data, "--out", out, "--max-steps", 4,
                             "--train.eval_every", 2, "--train.eval_batches", 1, "--no-progress",
                             "--lora-rank", 2, "--lora-targets", "attn"], capsys)
    assert code == 0, err
    assert "+ lm_head in full" in stdout
    adapter = load_file(str(out / "adapter.safetensors"))
    assert "lm_head.weight" in adapter and adapter["lm_head.weight"].shape[0] == 2
    assert json.loads((out / "metrics.json").read_text())["trainable"] == "lora+head"
    code, from_adapter, err = run(["classify", out, "win cash"], capsys)  # base + adapter merged in memory
    assert code == 0, err
    code, _, err = run(["lora", "merge", out, tmp_path / "merged"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "merged" / "labels.json").read_text()) == {"ham": 0, "spam": 1}
    code, stdout, err = run(["classify", tmp_path / "merged", "win cash"], capsys)
    assert code == 0, err
    assert stdout.split("\t")[0] in ("ham", "spam") and stdout.split("\t")[0] == from_adapter.split("\t")[0]


def test_lora_export_peft_cli_writes_peft_files(adapted, tmp_path, capsys):
    _, folder, _ = adapted
    code, stdout, err = run(["lora", "export-peft", folder, tmp_path / "peft"], capsys)
    assert code == 0, err
    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in tensors
    assert "base_model.model.lm_head.lora_B.weight" in tensors


@pytest.mark.parametrize("argv, needle", [
    (["lora", "merge", "{base}", "{tmp}/m"], "no adapter_config.json"),
    (["lora", "merge", "{tmp}/nowhere", "{tmp}/m"], "nowhere"),
    (["lora", "export-peft", "{base}", "{tmp}/p"], "no adapter_config.json"),
    (["finetune", "instruct", "{base}", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/o", "--lora-rank", 2,
      "--lora-targets", "nonsense"], "'nonsense' matches no linear layer"),
    (["finetune", "instruct", "{base}", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/o", "--lora-rank", 0],
     "--lora-rank 0: out of range; allowed: > 0"),
])
def test_bad_input_exits_2_with_one_line(cli_base, tmp_path, capsys, argv, needle):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 3))
    argv = [str(a).format(base=cli_base, tmp=tmp_path) for a in argv]
    code, _, err = run(argv, capsys)
    assert_user_error(code, err, needle)


def test_adapter_file_that_does_not_fit_its_config_is_a_user_error(adapted):
    from safetensors.torch import save_file

    _, folder, _ = adapted
    tensors = load_file(str(folder / "adapter.safetensors"))
    tensors.pop("blocks.0.attn.qkv.lora_A")
    tensors["blocks.1.mlp.fc.lora_B"] = torch.zeros(3, 3)
    save_file(tensors, str(folder / "adapter.safetensors"))
    with pytest.raises(UserError, match=r"does not fit adapter_config.json — 1 shape mismatch.*blocks.1.mlp.fc.lora_B"
                                        r".*1 missing tensor\(s\), first: blocks.0.attn.qkv.lora_A"):
        load_adapter(folder)


def test_nan_in_an_adapter_is_refused_at_load_in_one_line(adapted, capsys):
    from safetensors.torch import save_file

    _, folder, _ = adapted
    weights = folder / "adapter.safetensors"
    tensors = load_file(str(weights))
    tensors["blocks.1.mlp.fc.lora_B"][0, 0] = float("nan")
    save_file(tensors, str(weights))
    with pytest.raises(UserError, match=r"adapter.safetensors: tensor blocks.1.mlp.fc.lora_B holds NaN/Inf values"):
        load_adapter(folder)
    code, _, err = run(["generate", folder, "--prompt", "Hi", "--max-new-tokens", 2], capsys)
    assert_user_error(code, err, f"{weights}: tensor blocks.1.mlp.fc.lora_B holds NaN/Inf values")


def test_old_import_paths_keep_working():
    import llmscratch.lora as lora
    import llmscratch.weights.peft as peft

    assert lora.export_peft is peft.export_peft and lora.peft_tensors is peft.peft_tensors
    assert lora.LoRASettings.__module__ == "llmscratch.lora_settings"


@pytest.mark.parametrize("preset", ["qwen3-moe-micro", "mla-micro", "gemma3-micro"])
def test_peft_export_refuses_layouts_transformers_peft_cannot_hold(preset):
    """PEFT's per-module adapters exist for the dense GPT-2 and Llama/Qwen3 layouts; the others are one line
    pointing at `lora merge`, never a KeyError."""
    from llmscratch.weights.peft import peft_tensors

    model = micro(preset, tie_embeddings=False)
    applied = apply_lora(model, "all", rank=2, alpha=4)
    cfg = {"model": model.config.to_dict(), "trainable_modules": [], "modules": list(applied.modules)}
    with pytest.raises(UserError, match="lora merge"):
        peft_tensors(cfg, lora_state_dict(model))
