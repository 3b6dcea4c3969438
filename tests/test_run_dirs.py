"""Run directories: simultaneous starts get distinct ids, --nosubdir never
overwrites another run, unfinished files of dead processes are removed, and
an output that cannot be written stops train.py before any work."""

import os
import subprocess
import sys

from click.testing import CliRunner

import dnnlib
import train
from _train_helpers import SMALL_RUN, TINY_ARCH, finish, invoke, run_dirs, start_train

TINY_RUN = [*TINY_ARCH, *SMALL_RUN, '--batch=8', '--duration=0.0001', '--snap=1000', '--dump=1000']

#----------------------------------------------------------------------------

def test_five_simultaneous_starts_get_five_run_directories(tmp_path, digits8):
    outdir = str(tmp_path / 'runs')
    procs = [start_train(f'--outdir={outdir}', f'--data={digits8}', *TINY_RUN, f'--desc=p{i}') for i in range(5)]
    for proc in procs:
        res = finish(proc)
        assert res[0] == 0, res[2][-3000:]
    dirs = run_dirs(outdir)
    assert sorted(os.path.basename(d)[:5] for d in dirs) == ['00000', '00001', '00002', '00003', '00004']
    assert sorted(os.path.basename(d).rsplit('-', 1)[1] for d in dirs) == [f'p{i}' for i in range(5)]
    assert all(os.path.isfile(os.path.join(d, 'stats.jsonl')) for d in dirs)

def test_nosubdir_refuses_another_run_and_removes_stale_temp_files(tmp_path, digits8):
    outdir = tmp_path / 'run'
    res = finish(start_train(f'--outdir={outdir}', '--nosubdir', f'--data={digits8}', *TINY_RUN, '--dump=1'))
    assert res[0] == 0, res[2][-3000:]
    msg = invoke(f'--outdir={outdir}', '--nosubdir', f'--data={digits8}', *TINY_RUN)
    assert msg == f'Error: --outdir={outdir} already holds a run (training_options.json) and --nosubdir would overwrite it; pass --resume={outdir} to continue it, or another --outdir.'

    # A file of a process that died while writing it, and one of a live process.
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True, check=True)
    (outdir / f'network-snapshot-000001.pkl.tmp-{int(dead.stdout)}').write_bytes(b'partial')
    (outdir / f'stats.npz.tmp-{os.getppid()}').write_bytes(b'busy')
    res = finish(start_train(f'--outdir={outdir}', '--nosubdir', f'--data={digits8}', *TINY_RUN, '--duration=0.002', f'--resume={outdir}'))
    assert res[0] == 0, res[2][-3000:]
    assert f'Removed "network-snapshot-000001.pkl.tmp-{int(dead.stdout)}"' in res[1]
    assert sorted(name for name in os.listdir(outdir) if '.tmp-' in name) == [f'stats.npz.tmp-{os.getppid()}']

def test_an_output_that_cannot_be_written_stops_before_any_work(tmp_path, digits8):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    msg = invoke(f'--outdir={blocker / "runs"}', f'--data={digits8}', *TINY_RUN)
    assert msg == f'Error: --outdir={blocker / "runs"} cannot be created: "{blocker}" is a file, not a folder; choose another path.'
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--data={digits8}', *TINY_RUN, '--seed=-1'])
    assert result.exit_code == 2 and "Error: Invalid value for '--seed': -1 is not in the range x>=0." in result.output

def test_check_writable_and_stale_files(tmp_path):
    dnnlib.util.check_writable(str(tmp_path / 'a' / 'b'), '--x') # Missing folders are fine.
    (tmp_path / 'x.tmp-notapid').write_bytes(b'')
    assert dnnlib.util.remove_stale_temp_files(str(tmp_path)) == [] and dnnlib.util.remove_stale_temp_files(str(tmp_path / 'none')) == []

#----------------------------------------------------------------------------
# The other scripts: outputs checked before any work; reference statistics never replaced.

def test_other_scripts_check_their_outputs_first(tmp_path, digits8):
    import dataset_tool, fid, generate # pylint: disable=import-outside-toplevel
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    missing_network = str(tmp_path / 'none.pkl') # Never read: the output is checked first.
    for command, args, name, path in [
        (generate.main, [f'--network={missing_network}', f'--outdir={blocker / "out"}'], '--outdir', blocker / 'out'),
        (generate.main, [f'--network={missing_network}', f'--grid={blocker / "g.png"}'], '--grid', blocker / 'g.png'),
        (fid.main, ['ref', f'--data={digits8}', f'--dest={blocker / "ref.npz"}', '--detector=pixels'], '--dest', blocker / 'ref.npz'),
        (dataset_tool.main, ['--source=digits', f'--dest={blocker / "d.zip"}'], '--dest', blocker / 'd.zip'),
    ]:
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 1 and 'Traceback' not in result.output, result.output
        assert result.output.strip().splitlines()[-1] == f'Error: {name}={path} cannot be created: "{blocker}" is a file, not a folder; choose another path.'
    ref = tmp_path / 'ref.npz'
    ref.write_bytes(b'old statistics')
    result = CliRunner().invoke(fid.main, ['ref', f'--data={digits8}', f'--dest={ref}', '--detector=pixels'])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == \
        f'Error: --dest={ref} already exists; delete it or pass another path.'
    assert ref.read_bytes() == b'old statistics'

#----------------------------------------------------------------------------
# Dataset images: headers checked before any work, a broken image named mid-run.

def image_folder(path, sizes):
    import numpy as np # pylint: disable=import-outside-toplevel
    import PIL.Image # pylint: disable=import-outside-toplevel
    path.mkdir()
    for idx, size in enumerate(sizes):
        PIL.Image.fromarray(np.full([size, size], idx * 9 % 255, dtype=np.uint8)).save(path / f'img{idx:03d}.png')
    return path

def test_dataset_images_are_checked_first_and_named_when_they_fail(tmp_path):
    mixed = image_folder(tmp_path / 'mixed', [8] * 20 + [16])
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={mixed}', *TINY_RUN)
    assert msg == (f"Error: --data: Image 'img020.png' in '{mixed}' is 16x16 grayscale, but the first is 8x8 grayscale; "
        'resize all images to one size with dataset_tool.py.')
    assert not os.path.exists(tmp_path / 'out')

    broken = image_folder(tmp_path / 'broken', [8] * 40)
    data = (broken / 'img033.png').read_bytes()
    start = data.index(b'IDAT') + 4
    (broken / 'img033.png').write_bytes(data[:start] + bytes(len(data) - start - 12) + data[-12:]) # The header survives, the pixels do not.
    res = finish(start_train(f'--outdir={tmp_path / "out"}', f'--data={broken}', *TINY_RUN, '--workers=1'))
    errors = [line for line in res[2].splitlines() if line.startswith('Error: ')]
    assert res[0] == 1 and len(errors) == 1 and 'Traceback' not in res[2], res[2][-3000:]
    assert errors[0].startswith('Error: Training stopped at tick ') and ' kimg): Image ' in errors[0] and "'img033.png'" in errors[0] and 'cannot be read' in errors[0], errors[0]
