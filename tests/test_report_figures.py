"""benchmarks/report_figures.py against docs/technical-report.md: every figure the script prints about the code
(grid sizes, gains, probabilities, defaults, sampler statistics, step errors) is quoted, at the printed precision, in
the report section that starts its line, so a change of the code that moves a figure fails here until the report
follows."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r'-?\d+(?:\.\d+)?(?:e-?\d+)?'

def report_sections():
    """{'3.2': text, ...} of the numbered sections and subsections, numbers written as the script prints them."""
    with open(os.path.join(ROOT, 'docs', 'technical-report.md'), encoding='utf-8') as f:
        text = f.read().replace('\u2212', '-')
    text = re.sub(r'(?<=\d),(?=\d{3}(?!\d))', '', text)                        # 65,536 -> 65536
    text = re.sub(r'\s*\\cdot\s*10\^\{?(-?\d+)\}?', r'e\1', text)                # 5.0\cdot10^{-4} -> 5.0e-4
    text = re.sub(r'(?<![\d.])10\^\{(-?\d+)\}', r'1e\1', text)                   # 10^{-5} -> 1e-5
    parts = re.split(r'^#{2,3} (\d+(?:\.\d+)?)\.? .*$', text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))

def figures(line):
    """The numbers of a printed line after its section label, thousands separators removed."""
    values = re.sub(r'(?<=\d),(?=\d{3}(?!\d))', '', line.split(' ', 1)[1])
    return re.findall(rf'(?<![\w.]){NUMBER}', values)

def test_figures_are_quoted():
    env = dict(os.environ, OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'report_figures.py')], env=env,
        capture_output=True, text=True, timeout=120, check=True).stdout
    lines = out.strip().splitlines()
    sections = report_sections()
    assert len(lines) >= 10 and len(sections) >= 20, (lines, list(sections))
    missing = []
    for line in lines:
        label = line.split(' ', 1)[0].rstrip('.')
        assert label in sections, f'"{line}" names no section of the report'
        lost = [v for v in figures(line) if not re.search(rf'(?<![\d.]){re.escape(v)}(?!\d|\.\d)', sections[label])]
        if lost:
            missing.append(f'section {label}: {lost} of "{line}"')
    assert not missing, 'docs/technical-report.md does not quote:\n' + '\n'.join(missing)

def test_figure_matching():
    # The matcher sees a figure only at its printed precision, in LaTeX or plain notation.
    assert figures('3.2 S=8 karras, T=64: gains 3 to 73.5, 20,000 nodes, p 5.0e-4, float32 - x -1.21') == \
        ['8', '64', '3', '73.5', '20000', '5.0e-4', '-1.21']
    sections = report_sections()
    assert re.search(r'(?<![\d.])5\.0e-4(?!\d|\.\d)', sections['6'])
    assert not re.search(r'(?<![\d.])73\.4(?!\d|\.\d)', sections['3.2'])
