"""One process or many: devices, process groups, DDP and FSDP2 wrapping, and the peak FLOP/s for MFU.

The same training and post-training code runs as one CPU process on a laptop and under
`torchrun` on GPU nodes. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; `setup_distributed` reads
them, picks the device and joins the process group (gloo on CPU, nccl on GPU; on several nodes
the group spans all of them, scripts/slurm.sh). `parallelize` then wraps the model the playbook's
way: DDP (replicated weights, bf16 autocast over float32 master weights) or FSDP2's `fully_shard`
on every block and on the root (bf16 parameters for compute, float32 master weights and
gradient reduction, each rank holding 1/N of weights, gradients and optimizer state).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

# Dense bf16 peak FLOP/s per device (no sparsity), for MFU; matched against the GPU's name.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12,
              "A800": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}

# Inductor on GPU: autotune the launch settings (block sizes, warps) of its fused elementwise and
# reduction kernels (the matmuls stay cuBLAS's), for a longer first compile; benchmarks/README.md
# measures what it gives. bench_train.py uses the same.
INDUCTOR_GPU_SETTINGS = {"max_autotune_pointwise": True}


def peak_flops_per_device(device: torch.device, configured: float = 0.0) -> float | None:
    """The configured figure, else the GPU's dense bf16 peak from its name, else None (no MFU)."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def setup_distributed(device: str = "auto", threads: int = 0, parallelism: str = "ddp") -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) from torchrun's environment, or a single process.

    device is "auto" (a GPU when there is one), "cpu" or "cuda"; threads the CPU threads per
    process (0: cores / processes). FSDP needs a process group even for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA device is visible; use device=cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    if world == 1 and parallelism == "fsdp" and "MASTER_ADDR" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    if (world > 1 or parallelism == "fsdp") and not dist.is_initialized():
        # A rank that dies makes the others' next collective fail after this timeout instead of
        # hanging for the default 30+ minutes; torchrun then stops the whole job.
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None,
                                timeout=timedelta(minutes=10))
    return rank, local_rank, world, dev


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(x: float, device: torch.device) -> float:
    """The mean of a number over ranks (the number itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPU and float32 on CPU (where bf16 matmuls are slow and tests want exact sums)."""
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
            "float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


def parallelize(model: nn.Module, parallelism: str, dtype: torch.dtype, device: torch.device, compiled: bool,
                world: int) -> tuple[nn.Module, torch.autocast]:
    """(the module to call for training, the autocast context to call it in).

    fsdp: FSDP2 on every block (one all-gathered unit each) and on the root (embeddings, final
    norm), compiled block by block as torchtitan does, so the all-gathers sit between graphs; the
    optimizer then sees this rank's shard only. ddp (several processes): replicated weights whose
    .grad tensors are views into DDP's all-reduce buckets, so gradients are held once. One process
    or DDP: float32 master weights, autocast runs the matmuls in `dtype`, and the whole training
    forward compiles as one graph (embedding, final norm and the loss's casts fuse too)."""
    sharded = parallelism == "fsdp"
    if compiled and device.type == "cuda":
        import torch._inductor.config as inductor_config  # here: loading Inductor takes seconds, CPU runs skip it
        for key, value in INDUCTOR_GPU_SETTINGS.items():
            setattr(inductor_config, key, value)
    train_model = model
    if sharded:
        if compiled:
            for block in model.blocks:
                block.compile()
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    elif world > 1:
        train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                          gradient_as_bucket_view=True)
    if compiled and not sharded:
        train_model = torch.compile(train_model)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and not sharded)
    return train_model, autocast


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are FSDP2 shards (DTensors)."""
    return any(getattr(p, "device_mesh", None) is not None for p in model.parameters())


def full_state_dict(model: nn.Module, all_ranks: bool = False) -> dict[str, torch.Tensor]:
    """Every weight, whole (gathered from all ranks under FSDP: a collective there): on rank 0's
    CPU, or with all_ranks on every rank's device."""
    if not is_sharded(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks))


def teardown() -> None:
    """Tear down in order, ranks together: DDP's reducer must be gone before the process group it
    uses (drop the DDP module first); left to the garbage collector after destroy, a gloo rank can
    hang or abort at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
