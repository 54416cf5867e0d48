"""Tiny model configurations shared by the model tests: small enough that every test runs in milliseconds."""

import os

import pytest
import torch

from llmscratch.config import ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def cfg() -> ModelConfig:
    return ModelConfig(vocab_size=97, context_length=32, d_model=32, n_layers=2, n_heads=4)


@pytest.fixture
def gqa_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=97, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
