"""Several processes, devices and machines through PyTorch's own stack: torchrun and DistributedDataParallel.

A process started by ``torchrun`` (or by ``samunet_train -num_gpus N``, which starts N processes the same way)
finds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment::

    dist = init_distributed("auto")     # one process per device: cuda:LOCAL_RANK with nccl, else the CPU with gloo
    dist.rank, dist.world_size, dist.device, dist.is_main
    dist.barrier(); dist.all_reduce_sum(tensor); dist.broadcast_object(obj)
    shard(items, dist.rank, dist.world_size)    # items[rank::world_size]: every item in exactly one part

Without those variables (or with ``WORLD_SIZE`` 1) every call is a no-op and ``rank`` is 0 of 1, so single-process
code needs no branches. ``torch_run_parts()`` reads the same variables for the commands that need no process group
at all (the embedding cache and prediction split their cases into parts).
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass

import torch

from samunet.utils import SamunetError

logger = logging.getLogger("samunet")


def torch_run_parts() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` outside torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise SamunetError("RANK / WORLD_SIZE / LOCAL_RANK in the environment are not integers (set by torchrun)") \
            from None
    if world < 1 or not 0 <= rank < world:
        raise SamunetError(f"RANK {rank} / WORLD_SIZE {world} in the environment are inconsistent")
    return rank, world, local


def shard(items: list, part_id: int, num_parts: int) -> list:
    """Part ``part_id`` of ``num_parts``: ``items[part_id::num_parts]`` (every item in exactly one part)."""
    check_parts(num_parts, part_id)
    return list(items)[part_id::num_parts]


def check_parts(num_parts: int, part_id: int) -> None:
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise SamunetError(f"-num_parts {num_parts} -part_id {part_id}: part_id must lie in 0..num_parts-1")


def local_device(device: str, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank`` on its machine: ``cuda:local_rank`` (made current, so that
    code that says ``cuda`` lands there) or the CPU."""
    from samunet.models.for_plans import resolve_device
    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise SamunetError(f"process with LOCAL_RANK {local_rank} has no GPU of its own (this machine has {n}); "
                           f"start at most {n} processes per machine (torchrun --nproc_per_node {n})")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            if self.backend == "nccl":
                torch.distributed.barrier(device_ids=[self.local_rank])
            else:
                torch.distributed.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all processes (a CPU tensor in, a CPU tensor out)."""
        if not self.active:
            return tensor
        t = tensor.to(self.device) if self.backend == "nccl" else tensor.clone()
        torch.distributed.all_reduce(t)
        return t.cpu()

    def broadcast_object(self, obj, src: int = 0):
        """``obj`` of process ``src``, on every process."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def batch_share(self, global_batch: int) -> int:
        """This process's part of a global batch: split as evenly as possible (the first ranks take the rest)."""
        if global_batch < self.world_size:
            raise SamunetError(f"global batch size {global_batch} is smaller than the {self.world_size} processes; "
                               "give --batch_size of at least the number of processes")
        return global_batch // self.world_size + (1 if self.rank < global_batch % self.world_size else 0)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in DistributedDataParallel (gradients averaged over processes), or itself in one process."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.local_rank] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def init_distributed(device: str = "auto") -> Distributed:
    """Join torchrun's process group (once per process) and pick this process's device."""
    rank, world, local = torch_run_parts()
    dev = local_device(device, local)
    if world == 1:
        return Distributed(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not torch.distributed.is_available():
        raise SamunetError("this PyTorch build has no torch.distributed; run a single process")
    if not torch.distributed.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise SamunetError(f"WORLD_SIZE {world} is set but {var} is not: start the processes with torchrun")
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    logger.debug("process %d of %d (local %d) on %s, backend %s", rank, world, local, dev, backend)
    return Distributed(rank, world, local, dev, backend)


# ----------------------------------------------------------------- -num_gpus: start the processes ourselves
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, world: int, port: int, func, kwargs: dict) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        func(**kwargs)
    except SamunetError as e:
        print(f"error (process {local_rank}): {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def spawn(num_processes: int, device: str, func, kwargs: dict) -> None:
    """Run ``func(**kwargs)`` in ``num_processes`` processes on this machine, as ``torchrun --standalone
    --nproc_per_node N`` would (nnU-Net's ``-num_gpus``): one per GPU, or CPU processes with ``device='cpu'``."""
    if num_processes < 1:
        raise SamunetError(f"-num_gpus {num_processes}: give at least 1")
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        raise SamunetError("-num_gpus starts its own processes; under torchrun leave it out (torchrun's "
                           "--nproc_per_node sets the number)")
    if device != "cpu":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < num_processes:
            raise SamunetError(f"-num_gpus {num_processes}: PyTorch sees {n} CUDA GPU(s) on this machine "
                               "(use --device cpu to start CPU processes instead)")
    import torch.multiprocessing as mp
    try:
        mp.spawn(_spawned, args=(num_processes, _free_port(), func, kwargs), nprocs=num_processes, join=True)
    except mp.ProcessExitedException as e:
        raise SamunetError(f"training process {e.error_index} of {num_processes} ended with exit code "
                           f"{e.exit_code} (its message is above)") from None
    except mp.ProcessRaisedException as e:
        raise SamunetError(f"a training process failed:\n{e}") from None
