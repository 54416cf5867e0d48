"""ModelConfig: GPT-2's exact shapes, parameter counts, and one UserError per kind of mistake."""

import json
import os

import pytest
import torch

from llmscratch.config import PRESETS, ModelConfig
from llmscratch.errors import UserError
from llmscratch.model import GPT

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (n_layer, n_embd, n_head) from OpenAI's hparams.json for each released GPT-2.
GPT2_SHAPES = {
    "gpt2-124m": (12, 768, 12),
    "gpt2-355m": (24, 1024, 16),
    "gpt2-774m": (36, 1280, 20),
    "gpt2-1558m": (48, 1600, 25),
}


@pytest.mark.parametrize("name", sorted(GPT2_SHAPES))
def test_gpt2_presets_have_openai_shapes(name):
    cfg = ModelConfig.from_preset(name)
    n_layers, d_model, n_heads = GPT2_SHAPES[name]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads) == (n_layers, d_model, n_heads)
    assert cfg.n_kv_heads == n_heads
    assert cfg.d_ff == 4 * d_model
    assert cfg.head_dim == 64
    assert (cfg.vocab_size, cfg.context_length) == (50257, 1024)
    assert cfg.qkv_bias and cfg.bias and cfg.tie_embeddings
    assert cfg.norm_eps == 1e-5
    assert cfg.name == name


def _meta_model(cfg: ModelConfig) -> GPT:
    with torch.device("meta"):
        return GPT(cfg)


def test_gpt2_124m_parameter_count():
    model = _meta_model(ModelConfig.from_preset("gpt2-124m"))
    assert model.num_params() == 124_439_808  # the figure quoted for GPT-2 small with a tied head
    assert model.num_params(exclude_embeddings=True) == 124_439_808 - 50257 * 768 - 1024 * 768


@pytest.mark.parametrize("name,expected", [("gpt2-355m", 354_823_168), ("gpt2-774m", 774_030_080),
                                           ("gpt2-1558m", 1_557_611_200)])
def test_larger_gpt2_parameter_counts(name, expected):
    # Parameter counts of OpenAI's checkpoints (transformers' GPT2LMHeadModel, tied head).
    assert _meta_model(ModelConfig.from_preset(name)).num_params() == expected


def test_small_presets():
    micro = GPT(ModelConfig.from_preset("gpt-micro"))
    assert micro.num_params() < 1_000_000
    mini = _meta_model(ModelConfig.from_preset("gpt-mini"))
    assert 9_500_000 < mini.num_params(exclude_embeddings=True) < 11_000_000


def test_preset_overrides():
    cfg = ModelConfig.from_preset("gpt-micro", vocab_size=300, dropout=0.1)
    assert cfg.vocab_size == 300 and cfg.dropout == 0.1 and cfg.d_model == PRESETS["gpt-micro"]["d_model"]


def test_unknown_preset_lists_valid_names():
    with pytest.raises(UserError) as err:
        ModelConfig.from_preset("gpt2-small")
    message = str(err.value)
    assert "gpt2-small" in message
    for name in PRESETS:
        assert name in message


def test_defaults_fill_derived_fields():
    cfg = ModelConfig(d_model=64, n_heads=4)
    assert cfg.n_kv_heads == 4 and cfg.d_ff == 256 and cfg.head_dim == 16


@pytest.mark.parametrize("kwargs,needle", [
    (dict(d_model=100, n_heads=12), "d_model=100 is not divisible by n_heads=12"),
    (dict(d_model=64, n_heads=8, n_kv_heads=3), "n_heads=8 is not divisible by n_kv_heads=3"),
    (dict(vocab_size=0), "vocab_size must be positive"),
    (dict(n_layers=-1), "n_layers must be positive"),
    (dict(context_length=0), "context_length must be positive"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
])
def test_invalid_shapes_raise_user_error(kwargs, needle):
    with pytest.raises(UserError, match="invalid model config") as err:
        ModelConfig(**kwargs)
    assert needle in str(err.value)


def test_replace_revalidates():
    with pytest.raises(UserError, match="not divisible"):
        ModelConfig().replace(n_heads=7)


def test_from_dict_unknown_key_names_it():
    with pytest.raises(UserError) as err:
        ModelConfig.from_dict({"d_model": 64, "n_heads": 4, "emb_dim": 64}, source="my.json")
    message = str(err.value)
    assert "my.json" in message and "emb_dim" in message and "d_model" in message  # the valid keys


def test_save_load_round_trip(tmp_path):
    cfg = ModelConfig(name="x", vocab_size=300, context_length=48, d_model=32, n_layers=3, n_heads=4,
                      n_kv_heads=2, d_ff=80, dropout=0.1, qkv_bias=False, bias=False, tie_embeddings=False,
                      norm_eps=1e-6, init_std=0.01, extra={"note": "hi", "n": [1, 2]})
    path = tmp_path / "config.json"
    cfg.save(path)
    assert json.loads(path.read_text())["n_kv_heads"] == 2
    assert ModelConfig.load(path) == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_preset_round_trip(tmp_path):
    cfg = ModelConfig.from_preset("gpt2-124m")
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg


def test_load_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        ModelConfig.load(tmp_path / "nope.json")


@pytest.mark.parametrize("text,needle", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                                         ('{"d_model": 64, "n_heads": 5}', "not divisible"),
                                         ('{"colour": 1}', "colour")])
def test_load_bad_file(tmp_path, text, needle):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        ModelConfig.load(path)
    assert needle in str(err.value)
