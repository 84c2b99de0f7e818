"""The one seam between the science and the launcher: rank, world, device and collectives.

torchrun, the deepspeed launcher and Ray Train all describe the process group through the
RANK / WORLD_SIZE / LOCAL_RANK environment; plain `python` has none of it and runs world 1,
where every collective is a no-op.
"""

from __future__ import annotations

import datetime
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from app_dist.foundations.errors import ConfigError


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


def check_device(setting: str, local_rank: int | None = None) -> None:
    """ConfigError, before any process group exists, when run.device asks for a GPU this
    process cannot use: none visible (run.device=cuda on a CPU machine, a container started
    without its GPUs), or fewer than the node's ranks (local rank k uses GPU k)."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'run.device' = 'cuda': this process sees no CUDA GPU "
                          "(torch.cuda.is_available() is False); use auto or cpu")
    if setting in ("cuda", "auto") and torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            # Local rank k uses GPU k of those visible, so every rank must see the node's GPUs
            # (a per-rank CUDA_VISIBLE_DEVICES, as some schedulers bind, leaves each one).
            shown = os.environ.get("CUDA_VISIBLE_DEVICES")
            raise ConfigError(f"config key 'run.device' = '{setting}': local rank {local_rank} "
                              f"needs GPU {local_rank}, but this process sees {visible}"
                              + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None
                                 else "")
                              + f"; start at most {visible} rank(s) per node, each seeing "
                                "all of the node's GPUs")


def _pick_device(setting: str, local_rank: int) -> torch.device:
    check_device(setting, local_rank)
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _store_for_this_round(rank: int, world_size: int,
                          timeout: datetime.timedelta) -> dist.Store | None:
    """The launcher's shared store, namespaced for this round of workers; None unless an
    elastic agent (torchrun) shares its store with the workers.

    torchrun's agent keeps one store for the whole job (c10d rendezvous: the store at the
    rendezvous endpoint; static: the agent's own), and the process group's keys in it carry no
    round, so a restarted rank could read a dead peer's gloo address from a previous round and
    fail with "connectFullMesh ... Connection refused". TORCHELASTIC_RESTART_COUNT cannot name
    the round: each node's agent counts its own restarts, so after one node's workers failed
    (or a killed node was started again, counting from 0) the nodes' counts differ, and a
    prefix built from them splits the ranks into namespaces where they wait for each other
    until the timeout. The ranks of a round agree on a fresh namespace instead
    (_agree_on_round).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"app_dist/round-{_agree_on_round(shared, rank, world_size, timeout)}",
                            shared)


_LEADER_KEY = "app_dist/leader"
_ACK_WAIT = datetime.timedelta(seconds=1)  # how long a rank waits before it reads the leader again


def _agree_on_round(store: dist.Store, rank: int, world_size: int,
                    timeout: datetime.timedelta) -> str:
    """A token every rank of this round returns, new in every round (every rank calls it).

    Rank 0 draws the token and publishes it under one key; every other rank answers under that
    token with a token of its own, and goes on once rank 0 has acknowledged that answer. The
    store still holds the keys of earlier rounds, whose processes are dead (an agent stops its
    workers before it joins the next rendezvous): a rank that read an earlier round's token
    gets no acknowledgement of its own fresh answer, and reads the leader key again until it
    holds this round's token.
    """
    if rank == 0:
        token = uuid.uuid4().hex
        store.set(_LEADER_KEY, token)
        for peer in range(1, world_size):
            answer = f"app_dist/{token}/rank-{peer}"
            store.wait([answer], timeout)
            store.set(f"app_dist/{token}/ack-{store.get(answer).decode()}", b"1")
        return token
    mine = uuid.uuid4().hex
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        token = store.get(_LEADER_KEY).decode()  # blocks until some round's rank 0 wrote it
        store.set(f"app_dist/{token}/rank-{rank}", mine)
        while True:
            try:  # the store answers when the key appears: no polling load on it
                store.wait([f"app_dist/{token}/ack-{mine}"], _ACK_WAIT)
                return token
            except dist.DistStoreError:  # not yet: is `token` still the leader's?
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: rank 0 of this round did not answer within "
                                   f"{timeout.total_seconds():.0f} s")
            if store.get(_LEADER_KEY).decode() != token:
                break  # an earlier round's token: answer this round's rank 0


def device_time(device: torch.device) -> float:
    """time.perf_counter() once `device` has finished the work queued on it (CUDA kernels run
    asynchronously; a CPU's are done when they return): the clock that times device work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


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
        store = _store_for_this_round(rank, world_size, timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank,
                                    world_size=world_size, timeout=timeout)
    return Platform(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)
