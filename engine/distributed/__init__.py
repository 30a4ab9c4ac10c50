"""Tensor parallelism over torch.distributed (NCCL on GPUs, gloo on the CPU): state.py (the process group, rank /
world size, all-reduce / all-gather with a timeout), launch.py (torchrun SPMD, a spawn launcher, each rank's
shard and engine), driver.py (rank 0 in the caller's process, the other ranks repeating its calls). The parallel
layers and the sharding rule are engine/model/layers/parallel.py."""

from engine.distributed.state import TPError, all_gather, all_reduce, init, is_parallel, rank, world_size

__all__ = ["TPError", "all_gather", "all_reduce", "init", "is_parallel", "rank", "world_size"]
