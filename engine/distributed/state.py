"""Parallel state of the tensor-parallel group over torch.distributed: NCCL on GPUs, gloo on the CPU.

One group per process (vLLM's parallel_state, with TP as the only dimension): `init()` reads torchrun's
environment (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) or takes them as arguments (the spawn
launcher in engine/distributed/launch.py passes them). The process group has a timeout (default 60 s): a rank
that dies or hangs makes the others' next collective fail within it with a TPError naming the rank, the world,
the collective and the timeout, never hang. With gloo a dead peer is seen at once (its socket closes); with NCCL
the watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default) aborts the communicator after the timeout.

NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 are
set before NCCL starts when they are unset (a program that uses multicast can put a shared host's GPUs out of
service; see the lent machines' notes). A value set otherwise is kept, with a warning.

CUDA graphs: `all_reduce` / `all_gather` are torch.distributed collectives on the current stream, which
ProcessGroupNCCL lets torch.cuda.graph capture (NCCL >= 2.9.6 supports stream capture); the decode graphs of
engine/worker/graphs.py capture them with the rest of the forward, as vLLM captures its NCCL all-reduce. Not yet
run on two GPUs here (no 2-GPU machine was lent): README "Tensor parallelism" says what to check there.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = float(os.environ.get("ANVIL_TP_TIMEOUT_S", 60))  # per collective; the env var overrides it
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

_state: dict = {"timeout_s": DEFAULT_TIMEOUT_S, "backend": None, "gather": None}


class TPError(RuntimeError):
    """A collective of the tensor-parallel group failed or timed out: another rank died, hangs or diverged."""


def multicast_off(env: dict | None = None) -> dict:
    """Set the NVLink-multicast switches to off where unset (in os.environ, or in `env` for a child's env)."""
    env = os.environ if env is None else env
    for k, v in NO_MULTICAST.items():
        if env.get(k) not in (None, v):
            log.warning("%s=%s is set; NVLink multicast should stay off (%s=%s)", k, env[k], k, v)
        env.setdefault(k, v)
    return env


def init(
    world_size: int | None = None,
    rank: int | None = None,
    *,
    backend: str | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    device: str | None = None,
) -> tuple[int, int]:
    """Join the tensor-parallel group (the default process group). Arguments left None come from torchrun's
    environment (WORLD_SIZE, RANK, MASTER_ADDR, MASTER_PORT; 1 / 0 when unset). backend: nccl when `device` is
    CUDA (or, with device None, when CUDA is available), else gloo. On CUDA the process's device becomes
    cuda:LOCAL_RANK. Returns (rank, world_size). A world of 1 starts no group."""
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    backend = backend or ("nccl" if cuda else "gloo")
    _state.update(timeout_s=float(timeout_s), backend=backend)
    if world == 1:
        return 0, 1
    if dist.is_initialized():
        if dist.get_world_size() != world or dist.get_rank() != rank:
            raise RuntimeError(f"a process group of world {dist.get_world_size()} (rank {dist.get_rank()}) is "
                               f"already initialised; asked for rank {rank} of {world}")  # fmt: skip
        return rank, world
    addr = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = master_port or int(os.environ.get("MASTER_PORT", 29500))
    if backend == "nccl":
        multicast_off()
        torch.cuda.set_device(local_rank())
    elif addr in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", world_size=world, rank=rank,
                            timeout=timedelta(seconds=timeout_s))  # fmt: skip
    return rank, world


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _state["gather"] = None


def is_parallel() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", 0)))


def timeout_s() -> float:
    return _state["timeout_s"]


def _fail(op: str, e: BaseException) -> TPError:
    return TPError(f"tensor-parallel {op} failed on rank {rank()} of {world_size()} "
                   f"(process-group timeout {timeout_s():g} s): another rank died, hangs or diverged: "
                   f"{type(e).__name__}: {e}")  # fmt: skip


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the group, in place (returned). Capturable in a CUDA graph on NCCL (current stream)."""
    if not is_parallel():
        return x
    try:
        dist.all_reduce(x)
    except Exception as e:
        raise _fail("all_reduce", e) from e
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's x (same shape on all ranks) along `dim`, in rank order."""
    if not is_parallel():
        return x
    world = world_size()
    x = x.contiguous()
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    try:
        if _state["backend"] == "nccl":
            dist.all_gather_into_tensor(out, x)
        else:  # gloo has no all_gather_into_tensor
            dist.all_gather(list(out.chunk(world, dim=0)), x)
    except Exception as e:
        raise _fail("all_gather", e) from e
    if dim in (0, -x.dim()):
        return out
    return torch.cat(out.chunk(world, dim=0), dim=dim)


def all_reduce_min(value: int) -> int:
    """The least of an int over the group (e.g. the KV blocks every rank can hold)."""
    if not is_parallel():
        return value
    t = torch.tensor([value], dtype=torch.int64, device="cuda" if _state["backend"] == "nccl" else "cpu")
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    except Exception as e:
        raise _fail("all_reduce(min)", e) from e
    return int(t.item())


def barrier() -> None:
    if is_parallel():
        try:
            dist.barrier()
        except Exception as e:
            raise _fail("barrier", e) from e
