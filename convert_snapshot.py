"""Convert a network snapshot pickle (of train.py, EDM or EDM2) into the code-free safetensors form that
training/checkpoint.py loads with this repository's own classes, without unpickling anything."""

import os

import click
import torch

import dnnlib
from training import checkpoint

#----------------------------------------------------------------------------

@click.command()
@click.option('--src', help='Snapshot pickle to convert (unpickled once: it runs its code)', metavar='PKL|URL',
    required=True)
@click.option('--dest', help='Safetensors file to write', metavar='X.safetensors', required=True)
def main(src, dest):
    """Convert a network snapshot pickle into a code-free .safetensors snapshot.

    The pickle is unpickled once, which runs the code it carries: convert only files you trust.

    \b
    python convert_snapshot.py --src=training-runs/00000-.../network-snapshot-000050.pkl --dest=teacher.safetensors
    """
    with dnnlib.util.user_errors():
        if not dest.lower().endswith('.safetensors'):
            raise ValueError(f'--dest={dest} does not end in .safetensors; name the file X.safetensors.')
        if os.path.exists(dest):
            raise ValueError(f'--dest={dest} already exists; delete it or pass another path.')
        dnnlib.util.check_writable(dest, '--dest')
        if checkpoint.is_safetensors(src):
            raise ValueError(f'--src={src} is already a safetensors snapshot; pass a snapshot pickle.')
        print(f'Unpickling "{src}" runs the code it carries, on the user\'s say-so; convert only files you trust.')
        data = checkpoint.load_snapshot(src)
        checkpoint.save_safetensors(dest, data)
        try: # Read back, the networks must equal the pickle's bit for bit.
            again = checkpoint.load_safetensors(dest)
            for key, value in data.items():
                if isinstance(value, torch.nn.Module):
                    theirs, ours = value.state_dict(), again[key].state_dict()
                    same = (theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k].cpu(), ours[k]) for k in theirs)
                    if theirs.keys() != ours.keys() or not all(same):
                        raise ValueError(f'"{dest}" does not rebuild the network "{key}" of the pickle exactly; '
                            'convert a snapshot of this repository\'s networks.')
        except ValueError:
            os.remove(dest)
            raise
    dropped = [key for key, value in data.items() if value is not None and again[key] is None]
    left_out = f' ({", ".join(dropped)} left out: not a class of training/)' if dropped else ''
    print(f'Wrote "{dest}" with the entries {", ".join(again)}{left_out}.')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
