"""Generate images with a teacher (EDM's Heun or Euler sampler) or a multistep consistency student (its S steps),
decoding latents through the snapshot's `encoder`; each image depends only on its seed."""

import os

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import checkpoint
from training import encoders
from training import guidance as guidance_lib
from training import preflight
from training import samplers

#----------------------------------------------------------------------------

def parse_seeds(ctx, param, value):
    try:
        seeds = dnnlib.util.parse_int_list(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx, param) from err
    if len(set(seeds)) != len(seeds):
        dup = next(s for i, s in enumerate(seeds) if s in seeds[:i])
        raise click.BadParameter(f'"{value}" lists seed {dup} more than once; give each seed once.', ctx, param)
    return seeds

def save_png(image, path):
    """Write a uint8 HWC array as PNG, atomically."""
    image = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image, 'L' if image.shape[2] == 1 else 'RGB')
    dnnlib.util.write_atomic(path, lambda f: image.save(f, format='PNG'))

#----------------------------------------------------------------------------

@click.command()
@click.option('--network', 'network_pkl', help='Network snapshot (.pkl, or code-free .safetensors) or URL',
    metavar='PKL|URL', required=True)
@click.option('--outdir', help='Where to save the images (one PNG per seed)', metavar='DIR')
@click.option('--subdirs', help='Put images in sub-folders of 1000 seeds', is_flag=True)
@click.option('--seeds', help='Random seeds (e.g. 1,2,5-10)', metavar='LIST', callback=parse_seeds, default='0-63',
    show_default=True)
@click.option('--class', 'class_idx', help='Class label  [default: random]', metavar='INT', type=click.IntRange(min=0))
@click.option('--batch', 'max_batch_size', help='Maximum batch size per process', metavar='INT',
    type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--grid', help='Also save all images as one grid PNG', metavar='PNG')
@click.option('--save_latents', help="Also save a latent snapshot's sampled latents (before decoding) as .npy",
    metavar='BOOL', type=bool, is_flag=False, flag_value=True, default=False, show_default=True)
@click.option('--device', help='Device to run on', metavar='auto|cuda|cpu', type=click.Choice(['auto', 'cuda', 'cpu']),
    default='auto', show_default=True)
@click.option('--sampler', help='auto = student if the snapshot is one, else heun; addim = the paper\'s aDDIM',
    metavar='auto|heun|euler|addim|student', type=click.Choice(['auto', 'heun', 'euler', 'addim', 'student']),
    default='auto', show_default=True)
@click.option('--steps', 'num_steps', help='Number of noise levels (heun/euler/addim)  [default: 18]', metavar='INT',
    type=click.IntRange(min=1))
@click.option('--sigma_min', help='Lowest noise level (heun/euler/addim)  [default: 0.002]', metavar='FLOAT',
    type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max', help='Highest noise level (heun/euler/addim)  [default: 80]', metavar='FLOAT',
    type=click.FloatRange(min=0, min_open=True))
@click.option('--rho', help='Exponent of the noise grid (heun/euler/addim)  [default: 7]', metavar='FLOAT',
    type=click.FloatRange(min=0, min_open=True))
@click.option('--S_churn', 'S_churn', help='Stochasticity strength (heun/euler/addim)  [default: 0]', metavar='FLOAT',
    type=click.FloatRange(min=0))
@click.option('--S_min', 'S_min', help='Stochastic min noise level (heun/euler/addim)  [default: 0]', metavar='FLOAT',
    type=click.FloatRange(min=0))
@click.option('--S_max', 'S_max', help='Stochastic max noise level (heun/euler/addim)  [default: inf]', metavar='FLOAT',
    type=click.FloatRange(min=0))
@click.option('--S_noise', 'S_noise', help='Stochastic noise inflation (heun/euler/addim)  [default: 1]', metavar='FLOAT',
    type=float)
@click.option('--stochastic', help='Re-noise between the steps of the student', metavar='BOOL', type=bool,
    is_flag=False, flag_value=True, default=False, show_default=True)
@click.option('--gnet', 'gnet_pkl', help='Guiding network (heun/euler/addim): unconditional or weaker', metavar='PKL|URL')
@click.option('--guidance', help='Guidance weight with --gnet, 1 = none', metavar='FLOAT', type=click.FloatRange(min=0))
def main(network_pkl, outdir, subdirs, seeds, class_idx, max_batch_size, grid, save_latents, device, sampler,
    stochastic, gnet_pkl, guidance, **sampler_kwargs):
    """Generate images with a diffusion network or a multistep consistency student.

    \b
    python generate.py --network=teacher.pkl --outdir=out --seeds=0-63 --grid=grid.png  # Heun, 18 steps.
    python generate.py --network=student.pkl --outdir=student --seeds=0-49999 --subdirs  # The student's S steps.
    python generate.py --network=edm2-img64-s-1073741-0.045.pkl --gnet=edm2-img64-xs-0134217-0.110.pkl \\
        --guidance=1.7 --outdir=out  # EDM2's autoguidance.
    torchrun --standalone --nproc_per_node=2 generate.py --network=teacher.pkl --outdir=out --seeds=0-999
    """
    sampler_kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
    if outdir is None and grid is None:
        raise click.ClickException('Nothing would be saved; give --outdir, --grid, or both.')
    with dnnlib.util.user_errors():
        for name, path in [('--outdir', outdir), ('--grid', grid)]:
            if path is not None:
                dnnlib.util.check_writable(path, name, folder=(name == '--outdir'))
        device = dist.init(device_type=None if device == 'auto' else device)
        dist.print0(f'Loading network from "{network_pkl}"...')
        data = checkpoint.load_snapshot(network_pkl)
        sigmas = checkpoint.student_levels(data, network_pkl)
        sampler = ('student' if sigmas is not None else 'heun') if sampler == 'auto' else sampler
        preflight.check_guidance(gnet_pkl, guidance)
        if gnet_pkl is not None and sampler == 'student':
            raise ValueError('--gnet guides only --sampler=heun, euler or addim; a student learned its guidance, so leave '
                '--gnet and --guidance out.')
        gnet = None
        if gnet_pkl is not None:
            dist.print0(f'Loading guiding network from "{gnet_pkl}"...')
            gnet = checkpoint.load_snapshot(gnet_pkl)['ema']
            guidance_lib.check_guide(data['ema'], gnet, where=f'The guide "{gnet_pkl}"')
        net = guidance_lib.guided(data['ema'], gnet, guidance, gnet_name=gnet_pkl).to(device).eval()
        net.requires_grad_(False)
        encoder = data.get('encoder') if encoders.is_latent(data.get('encoder')) else None # None: images in [-1, 1].
        if save_latents and encoder is None:
            raise ValueError(f'--save_latents needs a latent snapshot, but "{network_pkl}" makes pixel images; '
                'leave it out.')
        if save_latents and outdir is None:
            raise ValueError('--save_latents saves the latents beside the PNGs of --outdir; give --outdir.')
        if encoder is not None:
            encoder.init(device)

    # Check the options against the network.
    if class_idx is not None and net.label_dim == 0:
        raise click.ClickException(f'--class={class_idx} was given, but the network is unconditional; leave it out.')
    if class_idx is not None and class_idx >= net.label_dim:
        raise click.ClickException(f'--class={class_idx} is out of range for a network with {net.label_dim} classes; '
            f'use 0 to {net.label_dim - 1}.')
    if sampler == 'student':
        if sigmas is None:
            raise click.ClickException(f'--sampler=student needs a consistency student, but "{network_pkl}" has no '
                'student grid; use --sampler=heun or euler.')
        if sampler_kwargs:
            names = ', '.join(f'--{key if key != "num_steps" else "steps"}' for key in sampler_kwargs)
            raise click.ClickException(f'{names} apply only to --sampler=heun, euler or addim; the student takes its '
                f'{len(sigmas) - 1} steps from the snapshot.')
        sample_fn, sample_kwargs = samplers.student_sampler, dict(sigmas=sigmas, stochastic=stochastic)
        desc = f'student sampler, S={len(sigmas) - 1}{", stochastic" if stochastic else ""}'
    else:
        if stochastic:
            raise click.ClickException('--stochastic applies only to --sampler=student; use --S_churn instead.')
        sample_fn = dict(heun=samplers.edm_sampler, euler=samplers.euler_sampler, addim=samplers.addim_sampler)[sampler]
        sample_kwargs = sampler_kwargs
        num_steps = sampler_kwargs.get('num_steps', 18)
        net_min, net_max, _round_sigma = samplers.noise_range(net)
        sigma_min = max(sampler_kwargs.get('sigma_min', 0.002), net_min)
        sigma_max = min(sampler_kwargs.get('sigma_max', 80), net_max)
        if not sigma_min < sigma_max:
            raise click.ClickException(f'The noise levels run from sigma_min={sigma_min} to sigma_max={sigma_max} '
                f'(the network supports {net_min} to {net_max}); choose --sigma_min below --sigma_max.')
        nfe = 2 * num_steps - 1 if sampler == 'heun' else num_steps
        desc = f'{sampler} sampler, {num_steps} steps, {nfe} network evaluations' + \
            guidance_lib.describe_text(gnet_pkl, guidance)
        note = samplers.noise_range_note(guidance_lib.unwrap(net), grid='the noise levels of --sigma_min, '
            '--sigma_max and --steps')
        if note is not None:
            dist.print0(note)

    # Equal numbers of batches per process.
    world = dist.get_world_size()
    num_batches = ((len(seeds) - 1) // (max_batch_size * world) + 1) * world
    rank_batches = torch.as_tensor(seeds).tensor_split(num_batches)[dist.get_rank() :: world]

    dist.print0(f'Generating {len(seeds)} images ({desc}) on {world} process(es)...')
    results = []
    for batch_seeds in tqdm.tqdm(rank_batches, unit='batch', disable=(dist.get_rank() != 0)):
        dist.barrier()
        if len(batch_seeds) == 0:
            continue
        images = samplers.generate_images(net, batch_seeds.tolist(), device, sample_fn, classes=class_idx,
            clip=(encoder is None), **sample_kwargs)
        latents = images.to(torch.float32).cpu().numpy() if save_latents else [None] * len(images)
        images = samplers.to_uint8(images) if encoder is None else encoder.decode(images)
        images = images.permute(0, 2, 3, 1).cpu().numpy()
        for seed, image, latent in zip(batch_seeds.tolist(), images, latents):
            if outdir is not None:
                image_dir = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
                os.makedirs(image_dir, exist_ok=True)
                save_png(image, os.path.join(image_dir, f'{seed:06d}.png'))
                if save_latents:
                    np_path = os.path.join(image_dir, f'{seed:06d}.npy')
                    dnnlib.util.write_atomic(np_path, lambda f, x=latent: np.save(f, x))
            if grid is not None:
                results.append((seed, image))

    # The grid.
    if grid is not None:
        results = [item for part in dist.gather_objects(results) for item in part]
        if dist.get_rank() == 0:
            order = {seed: i for i, seed in enumerate(seeds)}
            results.sort(key=lambda item: order[item[0]])
            os.makedirs(os.path.dirname(os.path.abspath(grid)), exist_ok=True)
            save_png(samplers.image_grid([image for _seed, image in results]), grid)

    dist.barrier()
    dist.print0('Done.')
    dist.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
