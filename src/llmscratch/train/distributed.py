"""Data parallelism over the processes `torchrun` starts (PyTorch's own engine: `torch.distributed` + DDP).

    torchrun --standalone --nproc_per_node 2 -m llmscratch pretrain --data ... --out ...

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process; `setup` joins them into one process group (NCCL
on CUDA, one GPU per process; gloo on CPU). Every process then runs the same trainer on its own share of each
batch:

* the batch sources draw the *global* batch (`--train.batch_size` sequences) from the same seeded stream in every
  process, and `shard` gives rank r its contiguous slice of rows — so no two ranks train on the same window in a
  step, the data position is the same everywhere (a checkpoint resumes on any number of processes), and the run
  computes the same losses as one process given the whole batch;
* DDP averages the gradients across ranks in backward (skipped on the accumulation micro-steps but the last);
  losses and evaluations are averaged with `mean`;
* rank 0 alone logs, draws, samples and writes checkpoints — except under FSDP2 (`--train.strategy fsdp`), where
  every rank writes its own shards of the weights and optimizer state into the step folder (llmscratch.sharded:
  torch.distributed.checkpoint, safetensors files), which resume on any number of processes.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op and training runs as one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass

import torch

from llmscratch.errors import UserError, one_line

TIMEOUT_ENV = "LLMSCRATCH_DIST_TIMEOUT_S"  # seconds a collective may wait for a silent rank (default 600)
_PEER_FAILURE = re.compile(r"timed out|connection (closed|reset)|gloo|nccl|broken pipe", re.IGNORECASE)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: `rank` of `world` processes, `local_rank` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and output (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether more than one process trains."""
        return self.world > 1


SINGLE = Ranks()  # one process: no torchrun


def ranks() -> Ranks:
    """This process's ranks as torchrun set them in the environment (one process when it did not)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device_name: str) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group (once) and return (ranks, this process's device): with CUDA, the GPU of its
    local rank; otherwise the CPU. One process: (Ranks(), the device `device_name` resolves to)."""
    import torch.distributed as dist

    from llmscratch.runtime import resolve_device

    r = ranks()
    device = resolve_device(device_name)
    if not r.active:
        return r, device
    if device.type == "cuda":
        if torch.cuda.device_count() <= r.local_rank:
            raise UserError(f"torchrun rank {r.rank}: local rank {r.local_rank} has no GPU (this machine has "
                            f"{torch.cuda.device_count()}); start at most that many processes per node")
        device = torch.device("cuda", r.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(f"--train.device {device_name}: torchrun training runs on CUDA (NCCL) or the CPU (gloo)")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return r, device


def shard(batch, r: Ranks):
    """Rank r's contiguous share of a global batch: the rows [r·B/world, (r+1)·B/world) of every tensor in
    `batch` (a tensor, or tuples, lists and dicts of them, batch first). B must divide evenly."""
    if not r.active:
        return batch
    if isinstance(batch, torch.Tensor):
        rows = batch.size(0)
        if rows % r.world:
            raise UserError(f"--train.batch_size {rows}: with {r.world} processes the global batch must divide "
                            f"evenly; use a multiple of {r.world}")
        per = rows // r.world
        return batch[r.rank * per:(r.rank + 1) * per]
    if isinstance(batch, dict):
        return {k: shard(v, r) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(v, r) for v in batch)
    return batch


def mean(value: torch.Tensor, r: Ranks) -> torch.Tensor:
    """`value` averaged over the ranks (itself with one process)."""
    if not r.active:
        return value
    import torch.distributed as dist

    value = value.detach().clone()
    dist.all_reduce(value)
    return value / r.world


def any_of(flags: list[bool], device: torch.device, r: Ranks) -> list[bool]:
    """Each flag true on any rank (a stop request, a time limit reached), so that every rank stops together."""
    if not r.active:
        return flags
    import torch.distributed as dist

    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def barrier(r: Ranks) -> None:
    if r.active:
        import torch.distributed as dist

        dist.barrier()


def wrap(model: torch.nn.Module, device: torch.device, r: Ranks, strategy: str = "ddp",
         amp_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model as the training steps call it, when several ranks train. `ddp`: a DistributedDataParallel
    wrapper (every rank holds all weights). `fsdp`: FSDP2 — `fully_shard` each transformer block and then the
    whole model, in place, so each rank holds 1/world of the weights, gradients and optimizer state, gathering a
    block's weights just before it runs (with a mixed-precision policy: bf16 compute, fp32 gradient reduction,
    under bf16 autocast). Call it before building the optimizer: FSDP2 replaces the parameters by sharded ones."""
    if not r.active:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else None
        kwargs = {"mp_policy": policy} if policy is not None else {}
        for block in model.blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # A mixture of experts leaves the experts no token was routed to without gradients in a step: DDP must look
    # for them (it otherwise waits for their gradients forever and fails).
    sparse = bool(getattr(getattr(model, "config", None), "n_experts", 0))
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=sparse)


def gradient_sync(stepped: torch.nn.Module, on: bool, r: Ranks):
    """A context for one micro-step's backward: gradients are averaged across ranks only when `on` (the last
    micro-step of an accumulated step), saving the communication of the others."""
    if not r.active or on:
        if hasattr(stepped, "set_requires_gradient_sync"):  # FSDP2: sync again after skipped micro-steps
            stepped.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(stepped, "no_sync"):  # DDP
        return stepped.no_sync()
    stepped.set_requires_gradient_sync(False)
    return contextlib.nullcontext()


def full(state):
    """`state` (a state dict, or an optimizer's, nested) with every sharded tensor (DTensor) gathered whole onto
    the CPU — a collective under FSDP: every rank must call it, in the same order. Plain tensors pass as they
    are, so one process and DDP get their state back unchanged."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, DTensor):
        return state.full_tensor().cpu()
    if isinstance(state, dict):
        return {k: full(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(full(v) for v in state)
    return state


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A whole optimizer state (as `full` saves it) cut to the shards of `optimizer`'s sharded parameters, so a
    checkpoint written by any number of processes resumes under FSDP2. Plain parameters keep whole tensors."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    cut = {}
    for index, entry in state["state"].items():
        p = params[int(index)]
        if isinstance(p, DTensor):
            entry = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                     if isinstance(v, torch.Tensor) and v.shape == p.shape else v for k, v in entry.items()}
        cut[index] = entry
    return {**state, "state": cut}


def on_main(work, r: Ranks):
    """`work()` on rank 0 alone (the output-folder guards, tokenizing the corpus: what must happen once), then
    every rank learns whether it failed: all stop with rank 0's one-line message if it did (any other failure
    of rank 0 stops the others at once too, rank 0 raising it as it came). Returns `work()`'s
    result on rank 0, None on the others. One process: simply `work()`."""
    if not r.active:
        return work()
    import torch.distributed as dist

    result, box, failure = None, [None], None
    if r.main:
        try:
            result = work()
        except UserError as exc:
            box[0] = str(exc)
        except BaseException as exc:  # (a bug, Ctrl-C): the others must not wait for rank 0 until the timeout
            box[0], failure = f"rank 0 failed: {type(exc).__name__}: {one_line(exc)[:300]}", exc
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure  # rank 0 shows its own traceback; the others stop with one line
    if box[0] is not None:
        raise UserError(box[0])
    return result


def from_main(value, r: Ranks):
    """Rank 0's `value` (a small picklable object, e.g. a path) on every rank; `value` itself with one process."""
    if not r.active:
        return value
    import torch.distributed as dist

    box = [value if r.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_global_batch(batch_size: int, r: Ranks) -> None:
    """The global batch (`--train.batch_size`) must split evenly across the ranks; the automatic size (0) finds
    one process's largest batch and is not offered to several."""
    if not r.active:
        return
    if batch_size == 0:
        raise UserError(f"--train.batch_size 0 (the largest that fits) is for one process; with {r.world} processes "
                        "give the global batch, a multiple of the number of processes")
    if batch_size % r.world:
        raise UserError(f"--train.batch_size {batch_size}: the global batch must split evenly across {r.world} "
                        f"processes; use a multiple of {r.world}")


@contextlib.contextmanager
def peers_answer(r: Ranks):
    """Run the body; when a collective fails because another process died or stopped answering (within
    LLMSCRATCH_DIST_TIMEOUT_S), end with one line saying so instead of a backend traceback."""
    if not r.active:
        yield
        return
    import torch.distributed as dist

    try:
        yield
    except RuntimeError as exc:  # NCCL raises DistError; gloo a plain RuntimeError ("Timed out waiting ...")
        if not isinstance(exc, dist.DistError) and not _PEER_FAILURE.search(str(exc)):
            raise
        limit = os.environ.get(TIMEOUT_ENV, "600")
        raise UserError(f"rank {r.rank}: another training process stopped answering or failed (waited up to "
                        f"{limit} s, {TIMEOUT_ENV}): {one_line(exc)[:200]}; see the other ranks' output") from None


def finish(r: Ranks) -> None:
    """Wait for every rank (rank 0 may still be writing the final checkpoint), then leave the process group."""
    if not r.active:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # without it, about one run in seven aborts at exit (gloo)
        dist.destroy_process_group()


def run_as_forward(stepped: torch.nn.Module, part, *args):
    """`part(model, *args)` — a loss's call of the model's parts (`features`, `lm_head`) instead of its forward —
    where `stepped` is the model as the trainer calls it: the model, its torch.compile wrapper, its DDP wrapper or
    the model sharded by FSDP2. DDP averages across ranks the gradients of what runs inside its forward only, and
    FSDP2 gathers the model's own (outermost) weights in its forward's hooks only, so there `part` runs as the
    model's forward for this one call (eagerly: such a loss bypasses torch.compile with one process too).
    `part` returns a tensor."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    wrapper = getattr(stepped, "_orig_mod", stepped)  # (the module under a torch.compile wrapper)
    if isinstance(wrapper, DistributedDataParallel):
        inner = wrapper.module
    elif isinstance(wrapper, FSDPModule):
        inner = wrapper
    else:
        return part(stepped, *args)
    inner.forward = lambda *a: part(inner, *a)  # an instance attribute: shadows the class's forward
    try:
        return wrapper(*args)
    finally:
        del inner.forward


def meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model`'s modules whose parameters and buffers live on the meta device (no memory): its shape
    before FSDP2 shards it in place, from which `whole` rebuilds it. Tied parameters stay tied."""
    import copy

    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(empty, t.requires_grad) if isinstance(t, torch.nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def whole(model: torch.nn.Module, skeleton: torch.nn.Module, device: torch.device, r: Ranks):
    """The FSDP2-sharded `model` as one ordinary module on rank 0 (None on the others): its weights gathered — a
    collective, every rank calls it — into `skeleton`, the `meta_copy` made before sharding. Rank 0 evaluates
    and writes alone with it once the others have left."""
    state = full(model.state_dict())
    if not r.main:
        return None
    tied = [(name, p) for name, p in skeleton.named_parameters(remove_duplicate=False)]
    first = {}
    for name, p in tied:
        first.setdefault(id(p), name)
    skeleton = skeleton.to_empty(device=device)
    for name, p in tied:  # re-tie what `to_empty` may have untied (a tied LM head: the token embedding)
        if first[id(p)] != name:
            owner, _, attr = name.rpartition(".")
            src_owner, _, src_attr = first[id(p)].rpartition(".")
            setattr(skeleton.get_submodule(owner), attr, getattr(skeleton.get_submodule(src_owner), src_attr))
    skeleton.load_state_dict(state)
    return skeleton
