"""README.md stays true: its option tables equal what the scripts accept, every
command it shows parses with the script's own options, the scripts answer
--help, and its CPU dataset command runs as written."""

import os
import re
import shlex
import subprocess
import sys

import click
import pytest

import update_readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('train.py', 'generate.py', 'fid.py', 'dataset_tool.py', 'reconstruct_phema.py', 'demo.py', 'convert_snapshot.py', 'update_readme.py')

def readme_text():
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        return f.read()

def readme_commands():
    """Every command line of the README's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', readme_text(), re.DOTALL):
        block = re.sub(r'\\\n\s*', ' ', block)
        for line in block.splitlines():
            line = line.split(' #')[0].strip()
            if line and not line.startswith('#'):
                commands.append(line)
    return commands

def script_invocation(command):
    """(script, its arguments) of a `python X.py ...` or `torchrun ... [--] X.py ...` command, else None."""
    tokens = shlex.split(command)
    if tokens[0] not in ('python', 'torchrun'):
        return None
    idx = next(i for i, token in enumerate(tokens) if token.endswith('.py'))
    return tokens[idx], tokens[idx + 1:]

#----------------------------------------------------------------------------

def test_option_tables_equal_the_scripts_options():
    text = readme_text()
    specs = [m.group('spec') for m in update_readme.BLOCK_RE.finditer(text)]
    assert specs == ['train.py', 'generate.py', 'fid.py calc', 'fid.py ref', 'dataset_tool.py convert', 'dataset_tool.py encode', 'reconstruct_phema.py', 'demo.py', 'convert_snapshot.py']
    assert update_readme.render(text) == text, 'README.md option tables are out of date; run "python update_readme.py".'
    # Every option of every script appears in its table, but the hidden old spellings of renamed options.
    for spec in specs:
        block = next(m.group('body') for m in update_readme.BLOCK_RE.finditer(text) if m.group('spec') == spec)
        for param in update_readme.load_command(spec).params:
            for name in ([] if getattr(param, 'hidden', False) else param.opts):
                assert f'`{name}`' in block, (spec, name)

def test_every_readme_command_parses():
    commands = readme_commands()
    checked = 0
    for command in commands:
        if command in ('make demo', 'make test'):
            continue
        invocation = script_invocation(command)
        assert invocation is not None, f'README command "{command}" is neither make nor a script of the repository.'
        script, args = invocation
        assert script in SCRIPTS, command
        spec = script
        if script == 'fid.py':
            spec, args = f'fid.py {args[0]}', args[1:]
        cmd = update_readme.load_command(spec)
        try:
            cmd.make_context(spec, list(args))
        except click.ClickException as err:
            pytest.fail(f'README command does not parse: {command}\n{err.format_message()}')
        checked += 1
    assert checked >= 20
    for target in ('demo', 'test'):
        with open(os.path.join(ROOT, 'Makefile')) as f:
            assert re.search(rf'^{target}:', f.read(), re.MULTILINE)

@pytest.mark.parametrize('script', ['train.py', 'generate.py', 'fid.py', 'dataset_tool.py', 'reconstruct_phema.py', 'demo.py', 'convert_snapshot.py'])
def test_scripts_answer_help(script):
    proc = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and 'Usage:' in proc.stdout, proc.stderr

def test_readme_dataset_command_runs_as_written(tmp_path):
    command = next(c for c in readme_commands() if c.startswith('python dataset_tool.py --source=digits'))
    script, args = script_invocation(command)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / 'datasets' / 'digits-16x16.zip').is_file()
