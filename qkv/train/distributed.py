"""The same training entry point on one process or many: torch.distributed, launched by ``torchrun``.

``torchrun --nproc_per_node=N -m qkv train …`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; we
join the process group (gloo on CPU, nccl on CUDA) and wrap the model in DistributedDataParallel, or
shard it with FSDP2 (``fully_shard`` per block, then the root). Whatever the wrapping, checkpoints
hold full, unsharded tensors under the plain parameter names, gathered with
``torch.distributed.checkpoint.state_dict`` — so a run saved on 4 GPUs resumes on 1 CPU and
``qkv.load`` reads it without knowing how it was trained. Only rank 0 writes.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

from ..errors import ConfigError

_FULL = StateDictOptions(full_state_dict=True)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mode: str = "single"  # single | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        """Sum numbers over every process (float64, so a sum of token counts stays exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return self.sum(float(flag))[0] > 0

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str, mode: str) -> Dist:
    """Join the process group when launched by torchrun; otherwise a single process."""
    from ..load import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = str(resolve_device(device))  # "auto" -> cuda if there is one; unknown or absent devices: one line
    if world <= 1:
        return Dist(device=torch.device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda asked for, but this machine has no CUDA GPU")
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, dev, mode)


def wrap(model: nn.Module, d: Dist, blocks: list[nn.Module]) -> nn.Module:
    """DDP or FSDP2 around ``model`` (``blocks``: the submodules FSDP shards one by one)."""
    if d.world == 1:
        return model
    if d.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    return nn.parallel.DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def no_sync(model: nn.Module, skip: bool):
    """DDP: no gradient all-reduce on the micro-steps before the last one of an accumulation."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return nullcontext()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters and buffers under their plain names (every rank takes part; all get it)."""
    state = get_model_state_dict(model, options=_FULL)
    return {k: v.detach().cpu() for k, v in state.items()}


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """The optimizer's tensors keyed "<param>/<slot>" and its param groups (JSON-ready)."""
    osd = get_optimizer_state_dict(model, opt, options=_FULL)
    tensors = {f"{name}/{slot}": (v if isinstance(v, torch.Tensor) else torch.tensor(v)).detach().cpu()
               for name, slots in osd["state"].items() for slot, v in slots.items()}
    return tensors, osd["param_groups"]


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         groups: list) -> None:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        name, _, slot = key.rpartition("/")
        state.setdefault(name, {})[slot] = v
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups}, options=_FULL)
