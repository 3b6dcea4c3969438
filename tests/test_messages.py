"""Every option a message names exists where the message is printed: a script's
strings name only its own options (or another command's, written after that
command's name); the library's strings, and those of demo.py (the argument lists
of the scripts it runs), name only options some script has."""

import ast
import glob
import importlib
import os
import re

import click
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('train.py', 'generate.py', 'fid.py', 'dataset_tool.py', 'reconstruct_phema.py', 'convert_snapshot.py')
DRIVERS = ('demo.py',) # Scripts whose strings are the arguments of the scripts they run.
LIBRARY = ('training', 'torch_utils', 'dnnlib')
OPTION_RE = re.compile(r'(?<![\w-])--([a-z][\w-]*)')
OTHER_COMMAND_RE = re.compile(r'\b(\w+\.py|torchrun)\b') # Options after this belong to that command.

def script_options(script):
    """The long option names of a script's click command and its subcommands."""
    command = importlib.import_module(os.path.splitext(script)[0]).main
    commands = [command, *getattr(command, 'commands', {}).values()]
    return {opt[2:] for cmd in commands for param in cmd.params for opt in [*param.opts, *param.secondary_opts] if opt.startswith('--')} | {'help'}

def named_options(path, own=None):
    """(line, option) of every --option in the string literals of a file, leaving out those
    after the name of another command than `own` in the same string."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            other = next((m.start() for m in OTHER_COMMAND_RE.finditer(text) if m.group(1) != own), len(text))
            found += [(node.lineno, m.group(1)) for m in OPTION_RE.finditer(text[:other])]
    return found

@pytest.mark.parametrize('script', SCRIPTS)
def test_script_messages_name_its_own_options(script):
    options = script_options(script)
    unknown = [(line, name) for line, name in named_options(os.path.join(ROOT, script), own=script) if name not in options]
    assert not unknown, f'{script} names options it lacks: {unknown}'

def test_library_and_driver_messages_name_existing_options():
    options = set().union(*(script_options(script) for script in SCRIPTS + DRIVERS))
    unknown = [(driver, line, name) for driver in DRIVERS for line, name in named_options(os.path.join(ROOT, driver)) if name not in options]
    for package in LIBRARY:
        for path in sorted(glob.glob(os.path.join(ROOT, package, '**', '*.py'), recursive=True)):
            unknown += [(os.path.relpath(path, ROOT), line, name) for line, name in named_options(path) if name not in options]
    assert not unknown, f'library messages name options no script has: {unknown}'
