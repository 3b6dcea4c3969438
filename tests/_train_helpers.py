"""Shared pieces of test_train.py and test_train_ddp.py: the 8x8 digits
dataset, running train.py in a subprocess, reading W&B's offline run files,
and a loss that records the training loop's calls of its hooks."""

import glob
import json
import os
import struct
import subprocess
import sys

import torch
from click.testing import CliRunner

from training.loss import EDMLoss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Options that keep the CPU runs small and deterministic.
SMALL_RUN = ['--batch=64', '--tick=1', '--snap=1', '--dump=1', '--seed=1', '--workers=0', '--lr_rampup=0', '--device=cpu']
TINY_ARCH = ['--arch=ddpmpp', '--cbase=16', '--cres=1', '--augment=0'] # The architecture of the shared test teacher.

def subprocess_env(wandb_home=None):
    """One thread per process: on a shared 2-core machine OpenMP's spinning threads are far slower.
    W&B keeps its cache, configuration and data under `wandb_home` when given."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)
    env.pop('WANDB_MODE', None)
    if wandb_home is not None:
        env.update({f'WANDB_{kind}_DIR': os.path.join(str(wandb_home), kind.lower()) for kind in ('CACHE', 'CONFIG', 'DATA')})
    return env

def build_digits(dest):
    """The digits dataset at 8x8 (its native size), written by dataset_tool.py."""
    proc = subprocess.run([sys.executable, 'dataset_tool.py', '--source=digits', f'--dest={dest}', '--resolution=8x8'],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(dest)

def train_teacher(outdir, data):
    """A teacher trained by train.py for 1 kimg on `data`; returns its last snapshot."""
    res = finish(start_train(f'--outdir={outdir}', '--nosubdir', f'--data={data}', *TINY_ARCH, *SMALL_RUN, '--duration=0.001'))
    assert res[0] == 0, res[2][-3000:]
    return os.path.join(str(outdir), 'network-snapshot-000001.pkl')

def invoke(*args):
    """train.py in this process with a user mistake: its one `Error: ` line (exit code 1, no traceback)."""
    import train # pylint: disable=import-outside-toplevel
    result = CliRunner().invoke(train.main, list(args))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith('Error: ')]
    assert len(lines) == 1 and 'Traceback' not in result.output, result.output
    return lines[0]

def start_train(*args, python_flags=(), wandb_home=None, env=None):
    """Start train.py (with `env` added to the environment); returns the Popen."""
    return subprocess.Popen([sys.executable, *python_flags, 'train.py', *args], cwd=ROOT,
        env=dict(subprocess_env(wandb_home), **(env or {})),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def finish(proc, timeout=600):
    """Wait for a Popen; returns (returncode, stdout, stderr)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err

def interrupted_runs(outdir_a, outdir_bc, args, a_args=()):
    """A: `args` (and `a_args`) for 2 kimg, uninterrupted. B: the same stopped at 1 kimg. C: B resumed to 2 kimg.
    Returns their run directories and the output of A and C."""
    proc_a = start_train(f'--outdir={outdir_a}', *args, *a_args, '--duration=0.002')
    res_b = finish(start_train(f'--outdir={outdir_bc}', *args, '--duration=0.001', '--desc=b'))
    assert res_b[0] == 0, res_b[2][-3000:]
    dir_b, = run_dirs(outdir_bc)
    res_c = finish(start_train(f'--outdir={outdir_bc}', *args, '--duration=0.002', f'--resume={dir_b}', '--desc=c'))
    assert res_c[0] == 0, res_c[2][-3000:]
    res_a = finish(proc_a)
    assert res_a[0] == 0, res_a[2][-3000:]
    dir_a, = run_dirs(outdir_a)
    return dict(a=dir_a, b=dir_b, c=run_dirs(outdir_bc)[1], out_a=res_a[1], out_c=res_c[1])

def tensors_equal(a, b):
    """Two state dicts hold the same names and bitwise the same tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)

def run_dirs(outdir):
    return sorted(os.path.join(outdir, name) for name in os.listdir(outdir) if not name.startswith('.') and os.path.isdir(os.path.join(outdir, name)))

def read_stats(run_dir):
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        return [json.loads(line) for line in f]

#----------------------------------------------------------------------------
# W&B's offline run file: a log of 32 KiB blocks whose records carry
# protobuf messages (wandb.proto.wandb_internal_pb2.Record).

def read_wandb_history(run_dir):
    """[{key: value}] of every history record of the offline W&B run in run_dir."""
    from wandb.proto import wandb_internal_pb2 # pylint: disable=import-outside-toplevel
    files = glob.glob(os.path.join(run_dir, 'wandb', 'offline-run-*', 'run-*.wandb'))
    assert len(files) == 1, files
    with open(files[0], 'rb') as f:
        data = f.read()
    assert data[:4] == b':W&B'
    block, header = 32768, 7
    pos, pending, history = header, b'', []
    while pos + header <= len(data):
        if block - pos % block < header: # Block trailer too short for a record header.
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack('<IHB', data[pos:pos + header])
        pos += header
        if kind == 0 and length == 0:
            break
        pending += data[pos:pos + length]
        pos += length
        if kind in (1, 4): # Full record, or the last piece of one.
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b''
            if record.WhichOneof('record_type') == 'history':
                history.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return history

#----------------------------------------------------------------------------
# Stand-ins that record what the training loop hands them.

class RecordingRun:
    """A W&B run that keeps what is logged: [(step, {key: value})]."""
    id = 'recording'

    def __init__(self):
        self.logged = []

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

VALIDATION_CALLS = []

def record_validation(tag, net, cur_tick, cur_nimg, **_kwargs):
    """A validation function named by `func_name`."""
    VALIDATION_CALLS.append((tag, cur_tick, cur_nimg, net.training))
    return dict(calls=len(VALIDATION_CALLS))

class HookLoss(EDMLoss):
    """EDMLoss that records the loop's calls of the optional loss hooks in `HookLoss.log`."""
    log = []

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.updates = 0
        HookLoss.log.append(('init',))

    def set_progress(self, cur_nimg):
        HookLoss.log.append(('set_progress', cur_nimg))

    def update_target(self, net):
        self.updates += 1
        HookLoss.log.append(('update_target', type(net).__name__, net.training))

    def state_dict(self):
        return dict(updates=self.updates)

    def load_state_dict(self, state):
        self.updates = state['updates']
        HookLoss.log.append(('load_state_dict', dict(state)))

#----------------------------------------------------------------------------

def run_loop(**kwargs):
    """The training loop on what preflight.setup() reads and checks for the same keyword arguments, as train.py runs it."""
    from training import preflight, training_loop # pylint: disable=import-outside-toplevel
    return training_loop.training_loop(**kwargs, inputs=preflight.setup(**kwargs))
