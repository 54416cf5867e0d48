"""FP8 training (`--train.precision fp8`): the matrix products of the transformer blocks in float8.

torchao's float8 training (`torchao.float8`) swaps an `nn.Linear` for a `Float8Linear` that keeps its weight in
fp32 (the optimizer and checkpoints see the usual parameters) and, in each product, scales the input and weight
to e4m3 and the output's gradient to e5m2 with one dynamic scale per tensor ("tensorwise": amax / fp8 max),
multiplies them with `torch._scaled_mm` and returns bf16. Everything else runs under bf16 autocast, as
`--train.precision bf16` does.

Which linears: those of the transformer blocks whose both sizes are multiples of 16 (`torch._scaled_mm`'s rule).
The LM head (GPT-2's 50,257 outputs are not a multiple of 16, and its logits are the most precision-sensitive
product), a mixture of experts' router and a classifier's head stay bf16. On H100/H200 (compute capability
8.9 or newer) the products run on the fp8 tensor cores; on a CPU PyTorch emulates `_scaled_mm` — slowly, but
with the same rounding, which is what the tests check the loss against.

`converted(model, device)` swaps in place for the length of a `with` block (the trainer's run) and swaps the
plain `nn.Linear`s back afterwards, holding the same parameter objects, so the caller gets back the model it
gave and its checkpoints load anywhere.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from llmscratch.errors import UserError

HIGH_PRECISION = ("lm_head", "router", "head")  # module names kept out of fp8 wherever they sit
MULTIPLE = 16  # torch._scaled_mm needs both matrix sizes divisible by 16
MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with fp8 tensor cores


def _torchao_float8():
    """torchao's float8 module, imported quietly (its import warns about C++ extensions that FP8 training does not
    use), or a UserError saying how to install it."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        import torchao.float8 as float8
    except ImportError as e:
        raise UserError("--train.precision fp8 needs torchao (float8 training): pip install 'llmscratch[fp8]'") from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return float8


def check_device(device: torch.device) -> None:
    """Refuse, in one line, a device that cannot run FP8 matrix products."""
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            raise UserError(f"--train.precision fp8: {name} (compute capability {cap[0]}.{cap[1]}) has no fp8 tensor "
                            "cores (8.9 or newer: L4, L40, H100, H200, B200); use --train.precision bf16")
    elif device.type != "cpu":
        raise UserError(f"--train.precision fp8 runs on CUDA GPUs (and, emulated, on a CPU), not on {device.type}; "
                        "use --train.precision bf16")


def eligible(module: nn.Module, name: str) -> bool:
    """Whether the linear `name` trains in fp8: a plain `nn.Linear` (a LoRA layer's frozen base included: its
    products with the activations run in fp8, the adapter's own in bf16; not one already converted) outside the
    high-precision heads, with both sizes multiples of 16."""
    leaf = name.rsplit(".", 1)[-1]
    return (type(module) is nn.Linear and leaf not in HIGH_PRECISION
            and module.in_features % MULTIPLE == 0 and module.out_features % MULTIPLE == 0)


def convert(model: nn.Module, device: torch.device) -> int:
    """Swap `model`'s eligible linears for torchao's `Float8Linear` (tensorwise dynamic scaling), in place; returns
    how many. Raises UserError when torchao is missing, the device has no fp8, or no linear is eligible."""
    check_device(device)
    names = [name for name, mod in model.named_modules() if eligible(mod, name)]
    if not names:
        raise UserError("--train.precision fp8: no linear layer of this model has both sizes a multiple of 16; "
                        "use --train.precision bf16")
    float8 = _torchao_float8()
    config = float8.Float8LinearConfig.from_recipe_name("tensorwise")
    float8.convert_to_float8_training(model, config=config, module_filter_fn=lambda mod, name: eligible(mod, name))
    return len(names)


def restore(model: nn.Module) -> int:
    """Swap every `Float8Linear` of `model` back for a plain `nn.Linear` holding the same weight and bias
    parameters; returns how many."""
    swapped = 0
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ != "Float8Linear":
            continue
        plain = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        plain.weight = mod.weight
        plain.bias = mod.bias
        plain.train(mod.training)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, plain)
        swapped += 1
    return swapped


@contextlib.contextmanager
def converted(model: nn.Module, device: torch.device):
    """`model` with its eligible linears in fp8 inside the block (`convert`), plain again after it (`restore`)."""
    convert(model, device)
    try:
        yield model
    finally:
        restore(model)
