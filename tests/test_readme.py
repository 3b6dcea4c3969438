"""README.md and docs/ stay true: their option tables equal what the scripts accept, every command of the
repository's scripts they show parses with the script's own options, the scripts answer --help, and the
dataset command runs as written."""

import os
import re
import shlex
import subprocess
import sys

import click
import pytest

import update_readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELP = ['train.py', 'generate.py', 'fid.py', 'dataset_tool.py', 'reconstruct_phema.py', 'demo.py',
    'convert_snapshot.py']
SCRIPTS = (*HELP, 'update_readme.py')
SPECS = ['train.py', 'generate.py', 'fid.py calc', 'fid.py ref', 'dataset_tool.py convert', 'dataset_tool.py encode',
    'reconstruct_phema.py', 'demo.py', 'convert_snapshot.py']

def doc_texts():
    """{path relative to the repository: text} of README.md and docs/*.md."""
    texts = dict()
    for path in update_readme.doc_files():
        with open(path, encoding='utf-8') as f:
            texts[os.path.relpath(path, ROOT)] = f.read()
    return texts

def bash_commands(text):
    """Every command line of the text's bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', text, re.DOTALL):
        for line in re.sub(r'\\\n\s*', ' ', block).splitlines():
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
    texts = doc_texts()
    for name, text in texts.items():
        assert update_readme.render(text) == text, f'{name} has stale option tables; run "python update_readme.py".'
    options_page = texts[os.path.join('docs', 'options.md')]
    blocks = {m.group('spec'): m.group('body') for m in update_readme.BLOCK_RE.finditer(options_page)}
    assert list(blocks) == SPECS
    for spec, block in blocks.items(): # Every option is in its table, but the hidden old spellings of renamed ones.
        for param in update_readme.load_command(spec).params:
            for name in ([] if getattr(param, 'hidden', False) else param.opts):
                assert f'`{name}`' in block, (spec, name)

def test_every_documented_command_parses():
    checked = 0
    for name, text in doc_texts().items():
        for command in bash_commands(text):
            invocation = script_invocation(command)
            if name == 'README.md' and command not in ('make demo', 'make test'):
                assert invocation and invocation[0] in SCRIPTS, f'"{command}" is neither make nor a script.'
            if invocation is None or invocation[0] not in SCRIPTS:
                continue # Docs may show other commands (benchmarks, conda).
            script, args = invocation
            cmd = update_readme.load_command(script)
            if isinstance(cmd, click.Group): # fid.py's commands; dataset_tool.py's 'convert' may be left out.
                sub = args[0] if args and args[0] in cmd.commands else None
                cmd, args = (cmd.commands[sub], args[1:]) if sub else (cmd.commands['convert'], args)
            try:
                cmd.make_context(script, list(args))
            except click.ClickException as err:
                pytest.fail(f'{name}: command does not parse: {command}\n{err.format_message()}')
            checked += 1
    assert checked >= 20
    with open(os.path.join(ROOT, 'Makefile')) as f:
        assert re.search(r'^demo:', makefile := f.read(), re.MULTILINE) and re.search(r'^test:', makefile, re.MULTILINE)

@pytest.mark.parametrize('script', HELP)
def test_scripts_answer_help(script):
    proc = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and 'Usage:' in proc.stdout, proc.stderr

def test_readme_dataset_command_runs_as_written(tmp_path):
    readme = bash_commands(doc_texts()['README.md'])
    command = next(c for c in readme if c.startswith('python dataset_tool.py --source=digits'))
    script, args = script_invocation(command)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=tmp_path, capture_output=True,
        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / 'datasets' / 'digits-16x16.zip').is_file()
