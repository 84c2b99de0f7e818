"""The one seam between the science and the launcher: rank, world, device and collectives.

torchrun, the deepspeed launcher and Ray Train all describe the process group through the
RANK / WORLD_SIZE / LOCAL_RANK environment; plain `python` has none of it and runs world 1,
where every collective is a no-op.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class Platform:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place (on the collective's device) and return it."""
        if not self.distributed:
            return tensor
        staged = tensor.to(self.device)
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        if staged is not tensor:
            tensor.copy_(staged)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's copy of `tensor` (same shape everywhere), on the CPU, in rank order."""
        if not self.distributed:
            return [tensor.cpu()]
        staged = tensor.to(self.device)
        gathered = [torch.empty_like(staged) for _ in range(self.world_size)]
        dist.all_gather(gathered, staged)
        return [t.cpu() for t in gathered]

    def broadcast(self, tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
        """Overwrite `tensor` in place with rank `source`'s copy (same shape on every rank)."""
        if not self.distributed:
            return tensor
        staged = tensor.to(self.device)
        dist.broadcast(staged, src=source)
        if staged is not tensor:
            tensor.copy_(staged)
        return tensor

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _pick_device(setting: str, local_rank: int) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _store_for_this_attempt(world_size: int,
                            timeout: datetime.timedelta) -> dist.Store | None:
    """torchrun's store, namespaced by restart attempt; None when torchrun is not the launcher.

    With torchrun's default (static) rendezvous the agent keeps one store across
    `--max-restarts` attempts and the workers' keys carry no attempt prefix, so a restarted
    rank can read a dead peer's gloo address from the previous attempt and fail with
    "connectFullMesh ... Connection refused". A per-attempt prefix makes every attempt start
    from a clean namespace.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"app_dist/attempt-{attempt}", shared)


def start_platform(device: str = "auto", timeout_s: int = 600) -> Platform:
    """Join the process group the launcher describes (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if "OMP_NUM_THREADS" not in os.environ:
        # Ranks on one machine share its cores; oversubscribing them slows every rank down.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    chosen = _pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        store = _store_for_this_attempt(world_size, timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank,
                                    world_size=world_size, timeout=timeout)
    return Platform(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)
