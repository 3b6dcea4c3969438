"""Process-group set-up for `torchrun`, rank-aware printing, and the
helpers that coordinate the ranks (rank 0 first, objects broadcast from
rank 0 or gathered from all, errors raised on every rank).

Launched by `torchrun`, `init()` joins the process group described by its
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): NCCL
when the processes use CUDA, gloo on the CPU. Launched directly, it is a
plain single process with rank 0 and world size 1.
"""

import contextlib
import os

import torch

from . import training_stats

#----------------------------------------------------------------------------

def launched_by_torchrun():
    """True when the environment of a torchrun (or torch.distributed.launch) worker is set."""
    return 'RANK' in os.environ and 'WORLD_SIZE' in os.environ

def init(device_type=None):
    """Join the torchrun process group, if any, and return the device to use.

    device_type: 'cuda', 'cpu' or None (CUDA when available). Each rank uses
    the GPU given by LOCAL_RANK.
    """
    if device_type is None:
        device_type = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device_type not in ('cuda', 'cpu'):
        raise ValueError(f'device_type="{device_type}" is invalid; use "cuda", "cpu" or None.')
    if device_type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('CUDA was requested (--device=cuda) but no CUDA device is available; pass --device=cpu or run on a machine with a GPU.')

    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = torch.device('cuda', local_rank) if device_type == 'cuda' else torch.device('cpu')
    if device_type == 'cuda':
        torch.cuda.set_device(device)

    if launched_by_torchrun() and not torch.distributed.is_initialized():
        backend = 'nccl' if device_type == 'cuda' else 'gloo'
        kwargs = dict(device_id=device) if device_type == 'cuda' else dict()
        torch.distributed.init_process_group(backend=backend, init_method='env://', **kwargs)

    sync_device = device if get_world_size() > 1 else None
    training_stats.init_multiprocessing(rank=get_rank(), sync_device=sync_device)
    return device

def set_cpu_threads(workers=0):
    """Choose the compute threads of a CPU rank so that the ranks of this machine,
    their data-loader workers and the work already running on it (the load
    average) do not oversubscribe its cores: OpenMP threads that wait for a
    busy core slow a step down many times over. OMP_NUM_THREADS, when set,
    decides instead. Returns the number of threads."""
    if 'OMP_NUM_THREADS' not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        ranks = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        idle = cores - os.getloadavg()[0] if hasattr(os, 'getloadavg') else cores
        torch.set_num_threads(max(1, min(cores // (ranks * (1 + workers)), int(idle) // ranks)))
    return torch.get_num_threads()

def shutdown():
    """Leave the process group, if one was joined."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

#----------------------------------------------------------------------------

def is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()

def get_rank():
    return torch.distributed.get_rank() if is_distributed() else 0

def get_world_size():
    return torch.distributed.get_world_size() if is_distributed() else 1

def barrier():
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        torch.distributed.barrier()

def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)

#

#----------------------------------------------------------------------------
# Coordination of the ranks.

@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first, then the other ranks (a download lands in
    the cache once, and the others read it from there)."""
    if get_rank() != 0:
        barrier()
    try:
        yield
    finally:
        if get_rank() == 0:
            barrier()

def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]

def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if get_world_size() == 1:
        return [obj]
    objs = [None] * get_world_size()
    torch.distributed.all_gather_object(objs, obj)
    return objs

def on_rank0(fn, share=False):
    """Call fn() on rank 0 only. A ValueError it raises is raised on every
    rank, so that all stop together. Returns fn's result on rank 0 (on every
    rank with `share`), None on the others."""
    result, message = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except ValueError as err:
            message = str(err)
    if get_world_size() > 1:
        result_shared, message = broadcast_object((result if share else None, message))
        if share:
            result = result_shared
    if message is not None:
        raise ValueError(message)
    return result

#----------------------------------------------------------------------------
