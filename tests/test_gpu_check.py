"""benchmarks/gpu_check.py --device=cpu --tiny: every check is named and passed
or skipped with a reason, and the throughput rows are all there."""

import json
import os
import subprocess
import sys

from _train_helpers import ROOT, subprocess_env

sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import gpu_check # pylint: disable=wrong-import-position

def test_tiny_cpu_run_writes_every_check_and_row(tmp_path):
    proc = subprocess.run([sys.executable, 'benchmarks/gpu_check.py', '--device=cpu', '--tiny', f'--out={tmp_path}'],
        cwd=ROOT, env=dict(subprocess_env(), OUT=''), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / 'gpu_check.json') as f:
        result = json.load(f)
    assert [c['name'] for c in result['checks']] == [name for name, _ in gpu_check.CHECKS]
    for check in result['checks']:
        assert check['status'] in ('passed', 'skipped'), check
        assert check['status'] == 'passed' or len(check['reason']) > 10, check
    passed = {c['name'] for c in result['checks'] if c['status'] == 'passed'}
    assert {'fixtures_fp32', 'attention_and_gradients', 'dropout_replay_live'} <= passed # What runs on the CPU runs.
    rows = {(r['network'], r['precision'], r['compile']): r for r in result['throughput']}
    assert set(rows) == {(n, p, c) for n in ('adm-tiny', 'edm2-tiny') for p in ('fp16', 'bf16') for c in (False, True)}
    for (_, _, compiled), row in rows.items():
        if compiled:
            assert row['status'] == 'skipped' and row['reason'] == '--tiny: no compilation'
        else:
            assert row['status'] == 'measured' and row['edm_img_per_s'] > 0 and row['cd_img_per_s'] > 0
            assert abs(row['cd_over_edm'] - row['edm_img_per_s'] / row['cd_img_per_s']) < 1e-9
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith('  edm2-tiny') and any(line.startswith('  network') for line in lines[-9:]) # The table comes last.

def test_default_output_folder_and_user_mistakes(tmp_path):
    env = dict(subprocess_env(), OUT=str(tmp_path / 'from-env'))
    proc = subprocess.run([sys.executable, 'benchmarks/gpu_check.py', '--device=cpu', '--tiny', '--checks=none', '--budget=-1'],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and os.path.isfile(tmp_path / 'from-env' / 'gpu_check.json'), proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, 'benchmarks/gpu_check.py', '--checks=fixtures', '--device=cpu'], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr and "--checks names unknown checks ['fixtures']" in proc.stderr
