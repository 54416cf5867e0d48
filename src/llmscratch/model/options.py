"""How a model computes, as opposed to what it computes: the options a `GPT` owns besides its config.

A `ModelConfig` fixes the architecture and the weights' shapes; `ModelOptions` choose between equivalent ways
of running the same math — recomputation for memory, a narrower residual stream, hand-written Triton kernels —
and never change what a checkpoint holds. A `GPT` owns one `ModelOptions` and hands the same instance to its
blocks' attention and feed-forward layers, so `GPT.set_options` changes it in place for all of them, and a
`torch.compile`d model, which guards on the values it read, retraces after a change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GELU_MODES = ("compiled", "always", "never")


@dataclass
class ModelOptions:
    """The model's run-time options. Change them on a model with `GPT.set_options(**changes)`."""

    #: Training: recompute each block's activations during backward instead of storing them: less memory for
    #: about a third more compute, so off unless a model does not fit otherwise
    #: (`--train.activation_checkpointing`).
    activation_checkpointing: bool = False
    #: Training under autocast: carry the residual stream between blocks in the autocast dtype (bf16) instead
    #: of fp32; norms still compute in fp32, what changes is the bytes moved per layer. Off here: without autocast
    #: it changes nothing, and on a CPU it showed no measured gain; the trainer turns it on on CUDA, where it
    #: made training steps faster (`--train.bf16_residual`, benchmarks/RESULTS.md).
    low_precision_residual: bool = False
    #: GPT-2's fc bias + GELU in one Triton kernel whose backward also sums the bias gradient (model/kernels.py,
    #: `gelu_bias`; on CUDA with Triton only). "compiled" (default): in training steps traced by torch.compile
    #: — the trainer's CUDA path, where it measured a small gain (benchmarks/RESULTS.md); eager calls keep the
    #: PyTorch spelling, since each eager launch of a Triton kernel costs host time and decoding never runs the
    #: backward the kernel exists for. "always": eager calls too (tests). "never": the PyTorch spelling
    #: everywhere (benchmarks/gpu_train.py's "torchgelu" variants).
    gelu_kernel: str = "compiled"
    #: Training on CUDA with Triton: split the fused q/k/v projection with `kernels.qkv_projection`, whose
    #: backward assembles the three gradients and the bias gradient in one pass. Off: it measured no gain in a
    #: training step, though it trims peak memory a little (benchmarks/RESULTS.md); benchmarks/gpu_train.py's
    #: "qkvkernel" variants turn it on.
    qkv_kernel: bool = False
    #: Training on CUDA with Triton: a loss chunk's losses and logit gradients from the Triton kernel of
    #: model/kernels.py, which reads the logits once (model/loss.py). On: it measured faster than the compiled
    #: PyTorch expression (benchmarks/RESULTS.md); False keeps the PyTorch spellings (benchmarks/gpu_train.py's
    #: "torchloss" variants).
    loss_kernel: bool = True

    def __post_init__(self) -> None:
        if self.gelu_kernel not in GELU_MODES:
            raise ValueError(f"ModelOptions.gelu_kernel: {self.gelu_kernel!r} is not one of "
                             f"{', '.join(GELU_MODES)}")
        for f in dataclasses.fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise TypeError(f"ModelOptions.{f.name} must be True or False, got {getattr(self, f.name)!r}")

    def update(self, **changes) -> ModelOptions:
        """Apply `changes` in place (all or none: they are validated first); returns self. `GPT.set_options`
        calls this on the instance its layers share."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown model option {', '.join(unknown)}; the options are {', '.join(sorted(names))}")
        checked = dataclasses.replace(self, **changes)  # runs __post_init__'s checks
        for name in changes:
            setattr(self, name, getattr(checked, name))
        return self
