"""Post-hoc EMA (Karras et al. 2024): snapshots of any EMA width sigma_rel at any training length covered, as the
least-squares combination (training/phema.py) of a run's power-function EMA snapshots (`train.py --phema`)."""

import os
import re

import click
import numpy as np
import torch
import tqdm

import dnnlib
from training import checkpoint
from training import phema

SNAPSHOT_RE = re.compile(r'network-snapshot-(\d{7})-(\d+\.\d{3})\.pkl') # Power-function EMA snapshots.
MAX_ERROR = 0.10 # Largest relative error of an output.

#----------------------------------------------------------------------------

def parse_stds(text):
    """'0.05,0.10' or a range 'lo-hi:step' (or a mix) -> a sorted list of sigma_rel."""
    if isinstance(text, list):
        return text
    stds, example = [], 'write e.g. 0.05,0.1 or 0.030-0.150:0.010'
    for part in text.split(','):
        number = r'\s*(\d*\.?\d+)\s*'
        if m := re.fullmatch(number, part):
            stds.append(float(m.group(1)))
        elif m := re.fullmatch(f'{number}-{number}:{number}', part):
            lo, hi, step = (float(g) for g in m.groups())
            if not (step > 0 and lo <= hi):
                raise click.BadParameter(f'"{part}" is not a range lo-hi:step with lo <= hi and step > 0; {example}.')
            stds += [float(v) for v in np.round(np.arange(lo, hi + step / 2, step), 6)]
        else:
            raise click.BadParameter(f'"{part}" is neither a number nor a range lo-hi:step; {example}.')
    return sorted(set(stds))

#----------------------------------------------------------------------------

@click.command()
@click.option('--indir',   help='Run directory with power-function EMA snapshots', metavar='DIR', required=True)
@click.option('--outdir',  help='Where to write the reconstructed snapshots', metavar='DIR', required=True)
@click.option('--outstd',  help='sigma_rel of the outputs: a list and/or ranges lo-hi:step', metavar='LIST',
              type=parse_stds, required=True)
@click.option('--outkimg', help='Training length of the outputs  [default: the newest snapshot]', metavar='KIMG',
              type=click.IntRange(min=1))
def main(indir, outdir, outstd, outkimg):
    """Post-hoc EMA snapshots of any width, phema-<kimg:07d>-<sigma_rel:.3f>.pkl, from a run's power-function EMA.

    \b
    Examples:
      python reconstruct_phema.py --indir=training-runs/00000-img64-edm2 --outdir=phema --outstd=0.050,0.100
      python reconstruct_phema.py --indir=RUN --outdir=phema --outstd=0.030-0.150:0.010 --outkimg=1048576
    """
    with dnnlib.util.user_errors():
        dnnlib.util.check_writable(outdir, '--outdir', folder=True)
    if not os.path.isdir(indir):
        raise click.ClickException(f'--indir={indir} is not a folder; pass the run directory of train.py --phema.')
    matches = [m for m in map(SNAPSHOT_RE.fullmatch, os.listdir(indir)) if m]
    if not matches:
        raise click.ClickException(f'--indir={indir} holds no power-function EMA snapshots '
            '(network-snapshot-<kimg>-<sigma_rel>.pkl); pass the run directory of train.py --phema.')
    snapshots = sorted((int(m.group(1)), float(m.group(2)), os.path.join(indir, m.group(0))) for m in matches)
    snapshots = [item for item in snapshots if item[0] > 0] # At kimg 0 a profile has no width yet.
    newest = max((item[0] for item in snapshots), default=0)
    out_kimg = newest if outkimg is None else outkimg
    if out_kimg > newest:
        raise click.ClickException(f'--outkimg={out_kimg} lies beyond the newest snapshot; pass at most {newest}.')
    for std in outstd:
        try:
            phema.std_to_exp(std)
        except ValueError as err:
            raise click.ClickException(f'--outstd={std:g}: {err}') from err
    snapshots = [item for item in snapshots if item[0] <= out_kimg]
    in_kimg, in_std = np.array([item[:2] for item in snapshots], dtype=np.float64).reshape(-1, 2).T
    try:
        coefs = phema.solve_posthoc_coefficients(in_kimg, in_std, out_kimg, outstd)
        errors = phema.posthoc_error(in_kimg, in_std, out_kimg, outstd, coefs)
    except ValueError as err:
        raise click.ClickException(f'--outstd: {err}') from err
    for std, error in zip(outstd, errors):
        if not error <= MAX_ERROR:
            raise click.ClickException(f'--outstd={std:g} cannot be reconstructed from the stored widths '
                f'{sorted(set(in_std.tolist()))} (relative error {error:.0%} > {MAX_ERROR:.0%}); ask for one nearer.')

    # The weighted sums, one snapshot at a time.
    print(f'Reconstructing {len(outstd)} profile(s) at {out_kimg} kimg from {len(snapshots)} snapshots of {indir}...')
    sums = template = reference = None
    for (_kimg, _std, path), row in zip(tqdm.tqdm(snapshots, unit='snapshot'), coefs):
        with dnnlib.util.user_errors():
            data = checkpoint.load_snapshot(path)
        state = data['ema'].state_dict()
        signature = (type(data['ema']).__name__, {name: tuple(t.shape) for name, t in state.items()})
        if reference is None:
            reference = (signature, os.path.basename(path))
            sums = [{name: torch.zeros_like(t, dtype=torch.float32) for name, t in state.items()} for _std in outstd]
        elif signature != reference[0]:
            raise click.ClickException(f'{indir} mixes the snapshots of different networks ("{reference[1]}" and '
                f'"{os.path.basename(path)}"); keep one run per folder.')
        for total, coef in zip(sums, row):
            for name, t in state.items():
                total[name] += float(coef) * t.to(torch.float32)
        template = data # The newest gives the other entries.

    os.makedirs(outdir, exist_ok=True)
    for std, total in zip(outstd, sums):
        net = template['ema']
        net.load_state_dict({name: value.to(net.state_dict()[name].dtype) for name, value in total.items()})
        path = os.path.join(outdir, f'phema-{out_kimg:07d}-{std:.3f}.pkl')
        checkpoint.save_snapshot(path, template) # Its 'ema' holds the new weights.
        print(f'Wrote {path}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
