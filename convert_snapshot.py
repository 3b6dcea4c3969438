"""Convert a network snapshot pickle (one written by train.py, or an official
EDM or EDM2 file) into the code-free safetensors form that
training/checkpoint.py reads without unpickling anything.

Reading the pickle runs the code it carries, once, on the user's say-so; the
safetensors file it writes holds only tensors and a JSON header, and loads
by constructing this repository's own classes."""

import os

import click
import torch

from training import checkpoint

#----------------------------------------------------------------------------

def check_same(data, dest):
    """Read `dest` back and check it against the pickle's snapshot: every network with
    the same tensors, bit for bit, in the same dtypes. Returns the rebuilt snapshot."""
    again = checkpoint.load_safetensors(dest)
    for key, value in data.items():
        if not isinstance(value, torch.nn.Module):
            continue
        theirs, ours = value.state_dict(), again[key].state_dict()
        same = theirs.keys() == ours.keys() and all(theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k].cpu(), ours[k]) for k in theirs)
        if not same:
            raise ValueError(f'"{dest}" does not rebuild the network "{key}" of the pickle exactly; convert a snapshot of this repository\'s networks.')
    return again

#----------------------------------------------------------------------------

@click.command()
@click.option('--src',  help='Snapshot pickle to convert (unpickled once: it runs its code)', metavar='PKL|URL', type=str, required=True)
@click.option('--dest', help='Safetensors file to write', metavar='X.safetensors',                             type=str, required=True)

def main(src, dest):
    """Convert a network snapshot pickle into a code-free .safetensors snapshot.

    The pickle is unpickled once, which runs the code it carries: convert only
    files you trust. The result loads with generate.py --network, train.py
    --teacher and --transfer without running any code of the file.

    Examples:

    \b
    python convert_snapshot.py --src=training-runs/00000-.../network-snapshot-000050.pkl --dest=teacher.safetensors
    python convert_snapshot.py --src=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl \\
        --dest=edm-cifar10-32x32-uncond-vp.safetensors
    """
    if not dest.lower().endswith('.safetensors'):
        raise click.ClickException(f'--dest={dest} does not end in .safetensors; name the file to write X.safetensors.')
    if checkpoint.is_safetensors(src):
        raise click.ClickException(f'--src={src} is already a safetensors snapshot; pass a snapshot pickle.')
    print(f'Unpickling "{src}" runs the code it carries, on the user\'s say-so; convert only files you trust.')
    try:
        data = checkpoint.load_snapshot(src)
        checkpoint.save_safetensors(dest, data)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    try:
        again = check_same(data, dest)
    except ValueError as err:
        os.remove(dest)
        raise click.ClickException(str(err)) from err
    dropped = [key for key, value in data.items() if value is not None and again[key] is None]
    print(f'Wrote "{dest}" with the entries {", ".join(again)}' + (f' ({", ".join(dropped)} left out: not a class of training/).' if dropped else '.'))

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
