"""Post-hoc EMA (Karras et al. 2024): synthesize the snapshot of any EMA width
sigma_rel, at any training length the snapshots cover, from the
power-function EMA snapshots of a run (`train.py --phema`, EDM2's names
`network-snapshot-<kimg:07d>-<sigma_rel:.3f>.pkl`).

The output weights are the least-squares combination of the stored profiles
(training/phema.py), summed in float32 and stored in the input's precision;
every other entry of the snapshot is that of the newest input snapshot. The
times are those of the file names (kimg), as in EDM2. A width that the stored
profiles cannot reconstruct to 10 % (relative L2 distance of the profiles) is
refused."""

import os
import re

import click
import numpy as np
import torch
import tqdm

from training import checkpoint
from training import phema

SNAPSHOT_RE     = re.compile(r'network-snapshot-(\d{7})-(\d+\.\d{3})\.pkl')    # Power-function EMA snapshots.
MAX_ERROR       = 0.10                                                          # Largest relative error of a reconstructed profile.

#----------------------------------------------------------------------------

def parse_stds(text):
    """'0.05,0.10' or a range 'lo-hi:step' (or a mix) -> a sorted list of sigma_rel."""
    if isinstance(text, list):
        return text
    stds = []
    for part in text.split(','):
        number = r'\s*(\d*\.?\d+)\s*'
        if m := re.fullmatch(number, part):
            stds.append(float(m.group(1)))
        elif m := re.fullmatch(f'{number}-{number}:{number}', part):
            lo, hi, step = (float(g) for g in m.groups())
            if not (step > 0 and lo <= hi):
                raise click.BadParameter(f'"{part}" is not a range lo-hi:step with lo <= hi and step > 0; write e.g. 0.030-0.150:0.010.')
            stds += [float(v) for v in np.round(np.arange(lo, hi + step / 2, step), 6)]
        else:
            raise click.BadParameter(f'"{part}" in "{text}" is neither a number nor a range lo-hi:step; write e.g. 0.050,0.100 or 0.030-0.150:0.010.')
    return sorted(set(stds))

def list_snapshots(indir):
    """[(kimg, sigma_rel, path)] of the power-function EMA snapshots in `indir`, sorted."""
    if not os.path.isdir(indir):
        raise click.ClickException(f'--indir={indir} is not a folder; pass the run directory of a train.py run with --phema.')
    found = sorted((int(m.group(1)), float(m.group(2)), os.path.join(indir, name)) for name in os.listdir(indir) if (m := SNAPSHOT_RE.fullmatch(name)))
    if not found:
        raise click.ClickException(f'--indir={indir} holds no power-function EMA snapshots (network-snapshot-<kimg>-<sigma_rel>.pkl); pass the run directory of a train.py run with --phema.')
    return found

def coefficients(snapshots, out_kimg, out_stds):
    """The least-squares coefficients [num_in, num_out] of the snapshots up to out_kimg."""
    in_kimg = np.array([kimg for kimg, _std, _path in snapshots], dtype=np.float64)
    in_std = np.array([std for _kimg, std, _path in snapshots], dtype=np.float64)
    try:
        coefs = phema.solve_posthoc_coefficients(in_kimg, in_std, out_kimg, out_stds)
        errors = phema.posthoc_error(in_kimg, in_std, out_kimg, out_stds, coefs)
    except ValueError as err:
        raise click.ClickException(f'--outstd: {err}') from err
    for std, error in zip(out_stds, errors):
        if not error <= MAX_ERROR:
            raise click.ClickException(f'--outstd={std:g} cannot be reconstructed from the stored widths {sorted(set(in_std.tolist()))} '
                f'(relative error {error:.0%} > {MAX_ERROR:.0%}); ask for a sigma_rel nearer to them, or run train.py with a --phema covering it.')
    return coefs

#----------------------------------------------------------------------------

@click.command()
@click.option('--indir',    help='Run directory with power-function EMA snapshots', metavar='DIR',            type=str, required=True)
@click.option('--outdir',   help='Where to write the reconstructed snapshots', metavar='DIR',                  type=str, required=True)
@click.option('--outstd',   help='sigma_rel of the outputs: a list and/or ranges lo-hi:step', metavar='LIST', type=parse_stds, required=True)
@click.option('--outkimg',  help='Training length of the outputs  [default: the newest snapshot]', metavar='KIMG', type=click.IntRange(min=1))
def main(indir, outdir, outstd, outkimg):
    """Post-hoc EMA: snapshots of any EMA width from the power-function EMA
    snapshots of a run. Each output, phema-<kimg:07d>-<sigma_rel:.3f>.pkl, is an
    ordinary snapshot that generate.py, validation and --teacher accept.

    \b
    Examples:
      python reconstruct_phema.py --indir=training-runs/00000-img64-edm2 --outdir=phema --outstd=0.050,0.100
      python reconstruct_phema.py --indir=RUN --outdir=phema --outstd=0.030-0.150:0.010 --outkimg=1048576
    """
    snapshots = [item for item in list_snapshots(indir) if item[0] > 0] # At kimg 0 a profile has no width yet.
    newest = max((kimg for kimg, _std, _path in snapshots), default=0)
    out_kimg = newest if outkimg is None else outkimg
    if out_kimg > newest:
        raise click.ClickException(f'--outkimg={out_kimg} lies beyond the newest snapshot of {indir} ({newest} kimg); pass at most {newest}.')
    for std in outstd:
        try:
            phema.std_to_exp(std)
        except ValueError as err:
            raise click.ClickException(f'--outstd={std:g}: {err}') from err
    snapshots = [item for item in snapshots if item[0] <= out_kimg]
    coefs = coefficients(snapshots, out_kimg, outstd)

    # The weighted sums, one snapshot at a time.
    print(f'Reconstructing {len(outstd)} profile(s) at {out_kimg} kimg from {len(snapshots)} snapshots of {indir}...')
    sums, template, reference = None, None, None
    for (kimg, std, path), row in zip(tqdm.tqdm(snapshots, unit='snapshot'), coefs):
        try:
            data = checkpoint.load_snapshot(path)
        except ValueError as err:
            raise click.ClickException(str(err)) from err
        net = data['ema']
        signature = (type(net).__name__, {name: tuple(t.shape) for name, t in net.state_dict().items()})
        if reference is None:
            reference = (signature, path)
            sums = [{name: torch.zeros_like(t, dtype=torch.float32) for name, t in net.state_dict().items()} for _std in outstd]
        elif signature != reference[0]:
            raise click.ClickException(f'{indir} mixes the snapshots of different networks ("{os.path.basename(reference[1])}" and "{os.path.basename(path)}"); keep one run per folder.')
        for total, coef in zip(sums, row):
            for name, t in net.state_dict().items():
                total[name] += float(coef) * t.to(torch.float32)
        template = data # The newest snapshot gives the other entries.

    # The outputs.
    os.makedirs(outdir, exist_ok=True)
    for std, total in zip(outstd, sums):
        net = template['ema']
        net.load_state_dict({name: value.to(net.state_dict()[name].dtype) for name, value in total.items()})
        path = os.path.join(outdir, f'phema-{out_kimg:07d}-{std:.3f}.pkl')
        checkpoint.save_snapshot(path, dict(template, ema=net))
        print(f'Wrote {path}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
