"""Shared pytest set-up: the repository root on sys.path, offline W&B."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault('WANDB_MODE', 'disabled')
