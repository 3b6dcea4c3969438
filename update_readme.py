"""Regenerate the option tables of README.md from the scripts' click
definitions, so that the tables cannot drift from what the scripts accept.

A table sits between `<!-- options: SCRIPT [SUBCOMMAND] -->` and
`<!-- /options -->`; `python update_readme.py` rewrites every such block and
`python update_readme.py --check` only reports whether one is out of date.
"""

import importlib
import os
import re
import sys

import click

ROOT = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(ROOT, 'README.md')
BLOCK_RE = re.compile(r'(<!-- options: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /options -->)', re.DOTALL)

#----------------------------------------------------------------------------

def load_command(spec):
    """The click command named by 'train.py' or 'fid.py calc'."""
    parts = spec.split()
    module = importlib.import_module(os.path.splitext(parts[0])[0])
    command = module.main
    for sub in parts[1:]:
        command = command.commands[sub]
    return command

def _value(param):
    if param.is_flag:
        return 'flag'
    if isinstance(param.type, click.Choice):
        return '\\|'.join(str(c) for c in param.type.choices)
    return (param.metavar or param.type.name.upper()).replace('|', '\\|')

def _has_default(param):
    return param.default is not None and 'UNSET' not in repr(param.default)

def _default(param):
    match = re.search(r'\s*\[default: ([^\]]*)\]', param.help or '')
    if match:
        return match.group(1)
    if param.is_flag and param.secondary_opts:
        return param.opts[0] if param.default else param.secondary_opts[0]
    if param.required:
        return '(required)'
    if param.is_flag or not _has_default(param):
        return ''
    if isinstance(param.default, (list, tuple)):
        return ','.join(str(v) for v in param.default)
    return str(param.default)

def options_table(spec):
    """A Markdown table of the options of a command: option, value, default, meaning."""
    rows = ['| option | value | default | meaning |', '|---|---|---|---|']
    for param in load_command(spec).params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        names = ', '.join(f'`{name}`' for name in param.opts + param.secondary_opts)
        meaning = re.sub(r'\s*\[default: [^\]]*\]', '', param.help or '').replace('|', '\\|')
        default = _default(param)
        rows.append(f'| {names} | {_value(param)} | {f"`{default}`" if default else ""} | {meaning} |')
    return '\n'.join(rows) + '\n'

def render(text):
    """README text with every options block regenerated."""
    return BLOCK_RE.sub(lambda m: m.group(1) + options_table(m.group('spec')) + m.group(4), text)

#----------------------------------------------------------------------------

@click.command()
@click.option('--check', help='Only report whether the tables are up to date', is_flag=True)
def main(check):
    """Regenerate the option tables of README.md from the scripts' click definitions."""
    sys.path.insert(0, ROOT)
    with open(README, encoding='utf-8') as f:
        text = f.read()
    new_text = render(text)
    if check:
        if new_text != text:
            raise click.ClickException('The option tables of README.md are out of date; run "python update_readme.py".')
        print('The option tables of README.md are up to date.')
        return
    if new_text != text:
        temp = README + '.tmp'
        with open(temp, 'w', encoding='utf-8') as f:
            f.write(new_text)
        os.replace(temp, README)
    print(f'Wrote {len(BLOCK_RE.findall(new_text))} option tables into README.md.')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
