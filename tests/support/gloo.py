"""Several ranks of a torch.distributed gloo group on loopback, each a spawned process, for tests
of the distributed maths (loss, accumulation, DDP/FSDP, checkpoints).

    run_ranks(work, world=2, out_dir=tmp)   # work(rank, out_dir) runs in each rank; results go to files

`work` must be a module-level function (spawn pickles it by name).
"""

from __future__ import annotations

import gc
import os
import socket
from typing import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out_dir: str, work: Callable[[int, str], None]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        work(rank, out_dir)
        gc.collect()  # its DDP models must be gone before the group is: one outliving it can abort
        dist.barrier()  # the process at exit ("terminate called without an active exception")
    finally:
        dist.destroy_process_group()


def run_ranks(work: Callable[[int, str], None], world: int, out_dir) -> None:
    """Run `work(rank, out_dir)` in `world` processes joined in one gloo group; raises if any fails."""
    mp.spawn(_rank_main, args=(world, free_port(), str(out_dir), work), nprocs=world, join=True)
