"""Tiny random GPT-2s from transformers, and OpenAI-format checkpoints of them written by TensorFlow, shared by
the weight-format tests."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# The interpreter that runs TensorFlow: this one (make test installs the `tf` extra), or another virtualenv's
# python named by LLMSCRATCH_TF_PYTHON, since TensorFlow only ever runs in a child process.
TF_PYTHON = os.environ.get("LLMSCRATCH_TF_PYTHON") or sys.executable
TF_WRITER = Path(__file__).with_name("make_openai_checkpoint.py")


def make_hf_gpt2(tmp_path: Path, seed: int = 0, **kw):
    """A random `transformers.GPT2LMHeadModel` (eval mode, no dropout) saved to tmp_path/hf and returned."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**kw, bos_token_id=kw["vocab_size"] - 1, eos_token_id=kw["vocab_size"] - 1,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # random LayerNorm and bias values, so a swapped or missing tensor cannot hide
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.normal_(0.0, 0.5).add_(1.0 if name.endswith("weight") else 0.0)
    model.save_pretrained(tmp_path / "hf")
    return model


@pytest.fixture(scope="session")
def hf_gpt2():
    """`make_hf_gpt2(tmp_path, seed=0, **GPT2Config fields)`."""
    pytest.importorskip("transformers", reason="transformers is a test dependency for parity")
    return make_hf_gpt2


@functools.cache
def _has_tensorflow() -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('tensorflow') is None)"
    try:
        return subprocess.run([TF_PYTHON, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def openai_arrays(model) -> dict[str, np.ndarray]:
    """A transformers GPT-2's weights under OpenAI's variable names and shapes (their `model.py`: conv1d
    weights are [1, nx, nf], LayerNorm scale/shift are g/b), written out here independently of our table."""
    sd = {k.removeprefix("transformer."): v.detach().numpy().copy() for k, v in model.state_dict().items()}
    arrays = {"model/wte": sd["wte.weight"], "model/wpe": sd["wpe.weight"],
              "model/ln_f/g": sd["ln_f.weight"], "model/ln_f/b": sd["ln_f.bias"]}
    for i in range(model.config.n_layer):
        for ln in ("ln_1", "ln_2"):
            arrays[f"model/h{i}/{ln}/g"] = sd[f"h.{i}.{ln}.weight"]
            arrays[f"model/h{i}/{ln}/b"] = sd[f"h.{i}.{ln}.bias"]
        for conv in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            hf = conv.replace("/", ".")
            arrays[f"model/h{i}/{conv}/w"] = sd[f"h.{i}.{hf}.weight"][None]  # (1, in, out)
            arrays[f"model/h{i}/{conv}/b"] = sd[f"h.{i}.{hf}.bias"]
    return arrays


@pytest.fixture(scope="session")
def openai_writer():
    """`write([(transformers GPT-2, folder), ...])`: each model saved into its folder as OpenAI's release is
    laid out (hparams.json + a TensorFlow checkpoint written by TensorFlow), all in one child process."""
    if not _has_tensorflow():
        pytest.skip(f"TensorFlow is not importable by {TF_PYTHON}: install the `tf` extra "
                    "(pip install -e '.[tf]') or set LLMSCRATCH_TF_PYTHON to a python that has it")

    def write(pairs) -> None:
        args = []
        for model, folder in pairs:
            folder.mkdir(parents=True, exist_ok=True)
            c = model.config
            (folder / "hparams.json").write_text(json.dumps({"n_vocab": c.vocab_size, "n_ctx": c.n_positions,
                                                             "n_embd": c.n_embd, "n_head": c.n_head,
                                                             "n_layer": c.n_layer}))
            arrays = folder.parent / f"{folder.name}-arrays.npz"
            np.savez(arrays, **openai_arrays(model))
            args += [str(arrays), str(folder)]
        subprocess.run([TF_PYTHON, str(TF_WRITER), *args], check=True, capture_output=True, timeout=600)

    return write
