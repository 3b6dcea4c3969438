"""The pinned versions of requirements.txt and environment.yml agree."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _pins(lines, pattern):
    pins = {}
    for line in lines:
        m = re.match(pattern, line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins

def test_requirements_and_environment_pin_the_same_versions():
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        req = _pins(f, r'^\s*([A-Za-z0-9_.-]+)==([^\s;#]+)\s*$')
    with open(os.path.join(ROOT, 'environment.yml')) as f:
        text = f.read().splitlines()
    env = _pins(text, r'^\s*-\s*([A-Za-z0-9_.-]+)=([^=\s]+)\s*$')
    env.update(_pins(text, r'^\s*-\s*([A-Za-z0-9_.-]+)==([^\s]+)\s*$'))
    env.pop('python', None)
    expected = {'torch', 'safetensors', 'numpy', 'scipy', 'click', 'pillow', 'requests', 'tqdm', 'wandb', 'psutil', 'scikit-learn', 'pytest', 'pytest-xdist', 'execnet', 'matplotlib',
        'diffusers', 'huggingface_hub', 'hf-xet', 'httpx2', 'httpcore2', 'truststore', 'regex', 'importlib_metadata', 'zipp', 'lazy-importer'} # diffusers (the VAE) and what it pulls in; pytest-xdist runs the suite on 2 processes.
    assert set(req) == expected
    assert env == req
