"""Sharded checkpoints: the weights and optimizer state of an FSDP2 run, each process writing its own shards.

A run trained with `--train.strategy fsdp` never gathers its whole weights and optimizer state into one process to
save a step: every rank writes the pieces it holds, with PyTorch's `torch.distributed.checkpoint` (DCP), into the
step folder's `sharded/` subfolder. DCP's safetensors storage is used (`HuggingFaceStorageWriter` with
`save_distributed=True`): rank r writes `shard-<r+1>-model-00001-of-00001.safetensors`, holding its piece of every
tensor, with each piece's offsets in the file's safetensors header. Nothing is pickled — DCP's default format
pickles its index — and the reader rebuilds the layout from those headers alone.

Loading reshards to whatever the loading processes hold: the whole tensors in one process (a run of 2 resumed by
1), other pieces under FSDP2 with another number of processes, whole copies under DDP. So a sharded checkpoint
resumes anywhere, and `llmscratch.checkpoint.load_model` reads it like an ordinary folder (`convert from-sharded`
writes one out).

Keys: `model.<name>` for the weights (a tied LM head left out, as in model.safetensors) and
`optim.<name>.<exp_avg|exp_avg_sq|step>` for the optimizer state, keyed by parameter name
(`torch.distributed.checkpoint.state_dict`), not by position. The optimizer's `param_groups` (learning rate,
betas…: no tensors) are returned by `save` for the caller's train_state.pt.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch

from llmscratch.errors import UserError, one_line


def _storage():
    try:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
    except ImportError:  # (PyTorch < 2.9)
        raise UserError(f"sharded checkpoints need PyTorch >= 2.9 (this is {torch.__version__}); upgrade torch, or "
                        "train with --train.strategy ddp") from None
    return HuggingFaceStorageReader, HuggingFaceStorageWriter


def _single_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def _quiet():
    """DCP warns that it "assumes a single process" even when told so (no_dist): hide that one warning. And on a
    file it cannot read, its loader logs a traceback through the root logger ("Global metadata is not found")
    before raising what `load` turns into one line: records of the root logger itself are dropped meanwhile (a
    named logger's, which only propagate to the root's handlers, are not)."""
    root = logging.getLogger()
    was = root.disabled
    root.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    finally:
        root.disabled = was


def _template(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, list | None]:
    """({"model": weights, "optim": optimizer state by parameter name}, the optimizer's param_groups): the model's
    and optimizer's own tensors (DTensor shards under FSDP2), which `save` writes and `load` fills in place. An
    optimizer without state yet gets it (a zero step with learning rate 0), so that there is something to fill."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        weights, groups, state = get_model_state_dict(model), None, None
    else:
        weights, optim = get_state_dict(model, optimizer)
        groups, state = optim["param_groups"], optim["state"]
    if getattr(model.config, "tie_embeddings", False):
        weights.pop("lm_head.weight", None)  # the embedding itself (safetensors refuses two names for one tensor)
    return ({"model": weights} if state is None else {"model": weights, "optim": state}), groups


def save(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """Every rank: write this rank's pieces of `model`'s weights and `optimizer`'s state into `folder` (made by
    the first writer); returns the optimizer's param_groups (no tensors), which the caller saves with the rest of
    the training state. A collective: all ranks call it, in the same order."""
    import torch.distributed.checkpoint as dcp

    _, writer = _storage()
    state, groups = _template(model, optimizer)
    with _quiet():
        dcp.save(state, storage_writer=writer(str(folder), save_distributed=True), no_dist=_single_process())
    return groups


def load(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
         param_groups: list[dict] | None = None) -> None:
    """Fill `model` (and `optimizer`, with `param_groups` when given) from the sharded checkpoint `folder`, each
    process taking the pieces it holds — every rank of the run calls it, or one process alone. A folder that is
    not a complete sharded checkpoint of this model is a UserError naming it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from llmscratch.checkpoint import check_finite

    folder = Path(folder)
    reader, _ = _storage()
    if not folder.is_dir() or not any(folder.glob("*.safetensors")):
        raise UserError(f"{folder}: no sharded checkpoint files (*.safetensors) here; the checkpoint is incomplete — "
                        "resume from an earlier one (checkpoints/step-*)")
    state, groups = _template(model, optimizer)
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet():
            dcp.load(state, storage_reader=reader(str(folder)), no_dist=_single_process())
    except (Exception, CheckpointException) as exc:  # (the latter a BaseException: each rank's failure with its
        # traceback, whose last line says what went wrong) — one line naming the folder
        cause = [line for line in str(exc).splitlines() if line.strip()][-1:] or [type(exc).__name__]
        raise UserError(f"{folder}: cannot read the sharded checkpoint ({one_line(cause[0])[:300]}); it is "
                        "incomplete or belongs to another model shape") from None
    check_finite({k: _local(v) for k, v in state["model"].items()}, folder)
    options = StateDictOptions(strict=False)  # (a tied LM head is not in the files)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"], options=options)
        return
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"], "param_groups": param_groups or groups}, options=options)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's piece of `t` (a DTensor's local shard), or `t` itself."""
    return t.to_local() if hasattr(t, "to_local") else t
