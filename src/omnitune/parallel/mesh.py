"""Device, process group and device mesh.

cuda -> nccl, npu (torch_npu importable and a device present) -> hccl, else cpu -> gloo. Runs the
same under `torchrun` with any number of processes, or as a plain `python` process (world size 1,
a local process group is created so the FSDP2 code path is the same everywhere).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class Dist:
    device: torch.device
    backend: str
    rank: int
    local_rank: int
    world_size: int
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_device_type() -> str:
    forced = os.environ.get("OMNITUNE_DEVICE")
    if forced:
        return forced
    if torch.cuda.is_available():
        return "cuda"
    try:
        import torch_npu  # noqa: F401
        if torch.npu.is_available():
            return "npu"
    except ImportError:
        pass
    return "cpu"


BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 10) -> Dist:
    dtype = detect_device_type()
    backend = BACKENDS[dtype]
    if "RANK" not in os.environ:  # plain `python`: a one-process group on loopback
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dtype == "cpu":
        device = torch.device("cpu")
    else:
        device = torch.device(dtype, local_rank)
        getattr(torch, dtype).set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    mesh = init_device_mesh(dtype, (world,), mesh_dim_names=("dp_shard",))
    return Dist(device, backend, rank, local_rank, world, mesh)


def shutdown(wait: bool = False) -> None:
    """Destroy the process groups. ``wait`` (a run that ended well on every rank): first a barrier,
    so no rank tears its gloo pairs down while a peer still works or has collectives in flight
    (measured: a rank that left first while rank 0 was still writing its plot aborted with
    "terminate called without an active exception" once in a CI run)."""
    if dist.is_initialized():
        if wait and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
