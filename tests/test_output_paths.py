"""Every output path of every script is probed before any work, by dnnlib.util.check_writable: a folder that
cannot be made (/proc/nope, even as root), or a plain file where a folder must go, stops the script with one
sentence naming the option, and nothing is sampled or written. Also dataset_tool.py's --dest formats and the
files named .npz/.npy that are no NumPy files."""

import errno
import os
import pickle
import tempfile

import pytest
from click.testing import CliRunner

import convert_snapshot
import dataset_tool
import dnnlib
import fid
import generate
import reconstruct_phema
import train
from _gaussian import GaussianNet
from _train_helpers import SMALL_RUN, TINY_ARCH
from training import metrics
from training.dataset import ImageFolderDataset

NO_PROC = not os.path.isdir('/proc/self')

#----------------------------------------------------------------------------
# Helpers.

def snapshot(path):
    net = GaussianNet(img_resolution=4, img_channels=1, label_dim=0, s=0.3)
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}), f)
    return str(path)

def listing(folder):
    return sorted(os.path.relpath(os.path.join(d, name), folder) for d, dirs, files in os.walk(folder) for name in dirs + files)

def refused(command, args, folder):
    """Run a click command that must stop at once: its one line, exit code 1, no traceback, `folder` unchanged."""
    before = listing(folder)
    result = CliRunner().invoke(command, [str(arg) for arg in args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output + repr(result.exception)
    assert 'Traceback' not in result.output and 'Generating' not in result.output and 'Computing' not in result.output
    assert 'Unpickling' not in result.output and 'Loading' not in result.output
    assert lines[-1].startswith('Error: ') and lines[-1].endswith('.') and lines[-1].count('; ') == 1, lines[-1]
    assert listing(folder) == before, 'something was written'
    return lines[-1]

def commands(tmp_path, digits8):
    """(command, args without the output option, output option) of every script's outputs."""
    net = snapshot(tmp_path / 'net.pkl')
    return [
        (train.main, [f'--data={digits8}', *TINY_ARCH, *SMALL_RUN, '--duration=0.0001'], '--outdir'),
        (generate.main, [f'--network={net}', '--seeds=0-3'], '--outdir'),
        (generate.main, [f'--network={net}', '--seeds=0-3'], '--grid'),
        (fid.main, ['ref', f'--data={digits8}', '--detector=pixels'], '--dest'),
        (dataset_tool.main, ['--source=digits'], '--dest'),
        (reconstruct_phema.main, [f'--indir={tmp_path}', '--outstd=0.1'], '--outdir'),
        (convert_snapshot.main, [f'--src={net}'], '--dest'),
    ]

FILE_NAMES = {'--grid': 'g.png', '--dest': 'd.zip'}

#----------------------------------------------------------------------------

@pytest.mark.skipif(NO_PROC, reason='no /proc here: no folder that not even root can make')
def test_outputs_under_proc_are_refused_before_any_work(tmp_path, digits8):
    for command, args, option in commands(tmp_path, digits8):
        name = 'x.safetensors' if command is convert_snapshot.main else 'r.npz' if command is fid.main else \
            FILE_NAMES.get(option, 'runs')
        path = f'/proc/nope/{name}'
        line = refused(command, [*args, f'{option}={path}'], tmp_path)
        assert line.startswith(f'Error: {option}={path} cannot be written in "/proc" ('), line
        assert line.endswith('); choose another path.') and not os.path.exists('/proc/nope')

def test_a_plain_file_as_an_output_folder_is_refused_before_any_work(tmp_path, digits8):
    blocker = tmp_path / 'file.pkl'
    blocker.write_bytes(b'kept')
    for command, args, option in commands(tmp_path, digits8):
        folder_output = option == '--outdir'
        path = blocker if folder_output else blocker / ('x.safetensors' if command is convert_snapshot.main else
            FILE_NAMES.get(option, 'r.npz'))
        line = refused(command, [*args, f'{option}={path}'], tmp_path)
        assert line == f'Error: {option}={path} cannot be created: "{blocker}" is a file, not a folder; choose another path.'
        assert blocker.read_bytes() == b'kept'

def test_a_folder_as_an_output_file_is_refused(tmp_path, digits8):
    (tmp_path / 'folder').mkdir()
    net = snapshot(tmp_path / 'net.pkl')
    for command, args in [(generate.main, [f'--network={net}', f'--grid={tmp_path / "folder"}']),
            (fid.main, ['ref', f'--data={digits8}', '--detector=pixels', f'--dest={tmp_path / "folder"}'])]:
        line = refused(command, args, tmp_path)
        assert line.endswith(f'={tmp_path / "folder"} is a folder; pass the path of a file.'), line

def test_check_writable_probes_without_leaving_anything(tmp_path, monkeypatch):
    (tmp_path / 'out').mkdir()
    for path, folder in [(tmp_path / 'a' / 'b', True), (tmp_path / 'a' / 'b.png', False), (tmp_path / 'out', True)]:
        dnnlib.util.check_writable(str(path), '--x', folder=folder)
    assert listing(tmp_path) == ['out'] # Nothing made, the probes removed.
    def read_only(*_args, **_kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, 'NamedTemporaryFile', read_only)
    with pytest.raises(ValueError) as info:
        dnnlib.util.check_writable(str(tmp_path / 'out' / 'new'), '--outdir', folder=True)
    assert str(info.value) == f'--outdir={tmp_path / "out" / "new"} cannot be written in "{tmp_path / "out"}" ' \
        f'({os.strerror(errno.EROFS)}); choose another path.'

def test_train_dry_run_writes_nothing(tmp_path, digits8):
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "runs"}', f'--data={digits8}', *TINY_ARCH, *SMALL_RUN,
        '--dry-run'])
    assert result.exit_code == 0 and 'Dry run: nothing written.' in result.output, result.output
    assert listing(tmp_path) == []

#----------------------------------------------------------------------------
# dataset_tool.py writes a .zip or a folder only.

@pytest.mark.parametrize('name', ['x.tar', 'x.tar.gz', 'x.tgz', 'x.7z', 'x.rar', 'x.NPZ'])
def test_dataset_tool_refuses_other_archive_formats(tmp_path, name):
    line = refused(dataset_tool.main, ['--source=digits', f'--dest={tmp_path / name}'], tmp_path)
    assert line == f'Error: --dest={tmp_path / name} is not a format dataset_tool.py writes; use a .zip or a folder.'
    line = refused(dataset_tool.main, ['encode', '--source=digits', f'--dest={tmp_path / name}'], tmp_path)
    assert 'is not a format dataset_tool.py writes' in line

#----------------------------------------------------------------------------
# Files named .npz or .npy that are no NumPy files: one sentence, without numpy's advice to load them unsafely.

def test_text_files_named_like_numpy_files(tmp_path):
    (tmp_path / 'text.npz').write_text('hello')
    line = refused(dataset_tool.main, [f'--source={tmp_path / "text.npz"}', f'--dest={tmp_path / "o.zip"}'], tmp_path)
    assert line.startswith(f"Error: Source '{tmp_path / 'text.npz'}' is not a NumPy .npz archive; ")
    with pytest.raises(ValueError) as info:
        metrics.load_ref_stats(str(tmp_path / 'text.npz'))
    assert str(info.value) == f'Reference statistics "{tmp_path / "text.npz"}" are not a readable .npz file (not a zip ' \
        'archive of NumPy arrays); pass statistics written by fid.py ref or published with EDM or EDM2.'
    with pytest.raises(ValueError) as info:
        metrics.load_ref_stats(str(tmp_path))
    assert str(info.value).startswith(f'Reference statistics "{tmp_path}" are a folder, not a file; ')
    (tmp_path / 'latents').mkdir()
    (tmp_path / 'latents' / 'a.npy').write_text('hello, this is text')
    with pytest.raises(ValueError) as info:
        ImageFolderDataset(path=str(tmp_path / 'latents'))
    assert str(info.value).startswith("Latents 'a.npy' in ") and 'magic string is not correct' in str(info.value)
    for text in [line, str(info.value)]:
        assert 'allow_pickle' not in text and 'unsafely' not in text

#----------------------------------------------------------------------------
