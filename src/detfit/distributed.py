"""Process facts in one place: device, rank, world size, the process group and cross-rank ops.

Nothing else in detfit calls ``torch.distributed``. Under torchrun the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) says how many processes there
are; in a plain process every function here answers for a world of one and the collectives are
identities, so the training and evaluation code reads the same either way.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detfit.errors import DetfitError, Interrupted

# A collective waiting longer than this on a rank that died is an error, not a hang.
TIMEOUT = timedelta(minutes=float(os.environ.get("DETFIT_DIST_TIMEOUT_MIN", "30")))


def launched_with_torchrun() -> bool:
    """True in a process that torchrun (or any launcher setting its variables) started."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def num_nodes() -> int:
    """Nodes in the job, from torchrun's variables (1 outside torchrun)."""
    return max(1, world_size() // max(local_world_size(), 1))


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def env_is_main() -> bool:
    """Rank 0 by the launcher's variables: still answers after the group is gone."""
    return int(os.environ.get("RANK", 0)) == 0


def elastic_restart_count() -> int:
    """How many times torchrun has restarted this worker group (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def elastic_max_restarts() -> int:
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: this process's GPU when CUDA is present, else the CPU. Under torchrun ``cuda``
    means the GPU of this process's local rank. A device that does not exist here is a
    :class:`DetfitError` naming what does."""
    spec = str(spec).strip()
    cuda = torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    if spec == "auto":
        spec = "cuda" if cuda else "cpu"
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise DetfitError(
            f"--device {spec!r}: not a device; choose auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not cuda:
            raise DetfitError(
                f"--device {spec}: no CUDA GPU is available here; use --device cpu (or auto)"
            )
        index = device.index if device.index is not None else local_rank() % count
        if index >= count:
            raise DetfitError(
                f"--device {spec}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise DetfitError(f"--device {spec}: not available here; choose auto, cpu or cuda")


def setup(device: torch.device) -> None:
    """Join the process group torchrun describes: gloo on the CPU, nccl on CUDA. A no-op in a
    plain process, or when the group is already up."""
    if not launched_with_torchrun() or int(os.environ["WORLD_SIZE"]) < 1 or is_initialized():
        return
    store, rank, size = attempt_store()
    options: dict = {"store": store, "rank": rank, "world_size": size, "timeout": TIMEOUT}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **options)
    else:
        dist.init_process_group("gloo", **options)


def attempt_store() -> tuple[dist.Store, int, int]:
    """torchrun's store (found the way ``env://`` finds it), under a prefix of its own for each
    elastic restart.

    torchrun keeps one store for the whole job (its rendezvous store is shared with the workers),
    and a process group writes its members' addresses under the same keys every time: a group
    restarted by ``--max-restarts`` then reads the killed group's addresses and fails to connect
    ("connectFullMesh ... Connection refused") or waits on a socket nobody answers.
    """
    store, rank, size = next(dist.rendezvous("env://", timeout=TIMEOUT))
    return dist.PrefixStore(f"detfit/attempt_{elastic_restart_count()}", store), rank, size


def shutdown(clean: bool = True) -> None:
    """Leave the process group deliberately.

    With gloo, tearing the group down while DDP objects are still alive aborts the interpreter at
    exit in about a quarter of runs (gloo threads holding async work during finalisation). The
    caller drops its DDP model first; here garbage is collected, every rank meets at a barrier,
    then the group is destroyed. After an error (``clean=False``) no barrier is attempted: the
    other ranks may be gone.
    """
    if not is_initialized():
        return
    gc.collect()
    if clean:
        with contextlib.suppress(RuntimeError):
            dist.barrier()
    with contextlib.suppress(RuntimeError, ValueError):
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """The process group for the block's duration: joined on entry (under torchrun), left
    deliberately on exit; after an error without waiting for the other ranks."""
    setup(device)
    try:
        yield
    except Interrupted:  # every rank stopped at the same step: leave together
        shutdown()
        raise
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (a download, a cache), the others after it finished."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` for training in this world: DistributedDataParallel when there are several
    processes, the model itself otherwise (the trainer converts SyncBatchNorm before, since the
    EMA copy must hold the converted layers too)."""
    if world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a copy; ``values`` is left as it was)."""
    values = values.detach().clone()
    if world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if world_size() == 1:
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=collective_device())).item())


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0, None elsewhere."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def collective_device() -> torch.device:
    """Where tensors for a collective live: nccl reduces CUDA tensors only, gloo the CPU's."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def launch_store(timeout_s: float = 30.0) -> dist.Store | None:
    """The store of the whole torchrun launch: the agent's TCPStore, which outlives every worker
    group it restarts. None outside torchrun, where the workers' store is not the agent's (then
    it dies with the group), or when it cannot be reached."""
    if not launched_with_torchrun() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=timeout_s),
        )
    except (KeyError, ValueError, RuntimeError):
        return None
