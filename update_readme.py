"""The option tables of README.md and docs/*.md, from the scripts' click definitions: each table sits between
`<!-- options: SCRIPT [SUBCOMMAND] -->` and `<!-- /options -->`."""

import glob
import importlib
import os
import re

import click

import dnnlib

ROOT = os.path.dirname(os.path.abspath(__file__))
BLOCK_RE = re.compile(r'(<!-- options: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /options -->)', re.DOTALL)
DEFAULT_RE = re.compile(r'\s*\[default: ([^\]]*)\]') # An explicit default in a help.

#----------------------------------------------------------------------------

def doc_files():
    return [os.path.join(ROOT, 'README.md'), *sorted(glob.glob(os.path.join(ROOT, 'docs', '*.md')))]

def load_command(spec):
    """The click command named by 'train.py' or 'fid.py calc'."""
    script, *subs = spec.split()
    command = importlib.import_module(os.path.splitext(script)[0]).main
    for sub in subs:
        command = command.commands[sub]
    return command

def _value(param):
    if param.is_flag:
        return 'flag'
    if isinstance(param.type, click.Choice):
        return '\\|'.join(str(c) for c in param.type.choices)
    return (param.metavar or param.type.name.upper()).replace('|', '\\|')

def _default(param):
    if match := DEFAULT_RE.search(param.help or ''):
        return match.group(1)
    if param.is_flag and param.secondary_opts:
        return param.opts[0] if param.default else param.secondary_opts[0]
    if param.required:
        return '(required)'
    if param.is_flag or param.default is None or 'UNSET' in repr(param.default):
        return ''
    return ','.join(map(str, param.default)) if isinstance(param.default, (list, tuple)) else str(param.default)

def options_table(spec):
    """A Markdown table of the options of a command."""
    rows = ['| option | value | default | meaning |', '|---|---|---|---|']
    for param in load_command(spec).params:
        if isinstance(param, click.Option) and not param.hidden:
            names = ', '.join(f'`{name}`' for name in param.opts + param.secondary_opts)
            meaning = DEFAULT_RE.sub('', param.help or '').replace('|', '\\|')
            default = f'`{_default(param)}`' if _default(param) else ''
            rows.append(f'| {names} | {_value(param)} | {default} | {meaning} |')
    return '\n'.join(rows) + '\n'

def render(text):
    """The text with every options block regenerated."""
    return BLOCK_RE.sub(lambda m: m.group(1) + options_table(m.group('spec')) + m.group(4), text)

#----------------------------------------------------------------------------

@click.command()
@click.option('--check', help='Only report whether the tables are up to date', is_flag=True)
def main(check):
    """Regenerate the option tables of README.md and docs/*.md."""
    stale = []
    for path in doc_files():
        with open(path, encoding='utf-8') as f:
            text = f.read()
        new_text = render(text)
        if new_text != text:
            stale.append(os.path.relpath(path, ROOT))
            if not check:
                dnnlib.util.write_atomic(path, lambda f, t=new_text: f.write(t.encode('utf-8')))
    if check and stale:
        raise click.ClickException(f'Stale option tables in {", ".join(stale)}; run "python update_readme.py".')
    print(f'Rewrote {", ".join(stale)}.' if stale and not check else 'The option tables are up to date.')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
