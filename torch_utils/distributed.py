"""Process-group set-up for torchrun (NCCL on CUDA, gloo on the CPU) and the helpers that coordinate the ranks."""

import contextlib
import os

import torch

from . import training_stats

#----------------------------------------------------------------------------

def init(device_type=None):
    """Join the torchrun process group, if any; return the device (device_type 'cuda', 'cpu' or None = auto)."""
    assert device_type in (None, 'cuda', 'cpu')
    cuda = torch.cuda.is_available() if device_type is None else device_type == 'cuda'
    if cuda and not torch.cuda.is_available():
        raise ValueError('CUDA was requested but no CUDA device is available.')
    device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0'))) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and not torch.distributed.is_initialized(): # torchrun
        torch.distributed.init_process_group(backend=('nccl' if cuda else 'gloo'), init_method='env://',
            **(dict(device_id=device) if cuda else dict()))
    training_stats.init_multiprocessing(rank=get_rank(), sync_device=(device if get_world_size() > 1 else None))
    return device

def set_cpu_threads(workers=0):
    """Share the idle cores among local ranks and their workers unless OMP_NUM_THREADS is set; return the threads."""
    if 'OMP_NUM_THREADS' not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
        ranks = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
        idle = cores - os.getloadavg()[0] if hasattr(os, 'getloadavg') else cores
        torch.set_num_threads(max(1, min(cores // (ranks * (1 + workers)), int(idle) // ranks)))
    return torch.get_num_threads()

def shutdown():
    if is_distributed():
        torch.distributed.destroy_process_group()

#----------------------------------------------------------------------------

def is_distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()

def get_rank():
    return torch.distributed.get_rank() if is_distributed() else 0

def get_world_size():
    return torch.distributed.get_world_size() if is_distributed() else 1

def barrier():
    if is_distributed():
        torch.distributed.barrier()

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)

@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first, then the other ranks."""
    if get_rank() != 0:
        barrier()
    try:
        yield
    finally:
        if get_rank() == 0:
            barrier()

def broadcast_object(obj):
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
    """fn() on rank 0, its ValueError raised on every rank, its result on rank 0 (every rank with `share`)."""
    result, message = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except ValueError as err:
            message = str(err)
    if get_world_size() > 1:
        shared, message = broadcast_object((result if share else None, message))
        result = shared if share else result
    if message is not None:
        raise ValueError(message)
    return result

#----------------------------------------------------------------------------
