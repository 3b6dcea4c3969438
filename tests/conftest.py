"""Shared pytest set-up: the repository root on sys.path, offline W&B."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault('WANDB_MODE', 'disabled')

import pytest # pylint: disable=wrong-import-position
import torch # pylint: disable=wrong-import-position

@pytest.fixture(scope='session')
def digits8(tmp_path_factory):
    """The digits dataset at 8x8 (its native size), written once by dataset_tool.py."""
    from _train_helpers import build_digits # pylint: disable=import-outside-toplevel
    return build_digits(tmp_path_factory.mktemp('data') / 'digits8.zip')

@pytest.fixture(scope='session')
def teacher(tmp_path_factory, digits8):
    """A small EDM teacher trained by train.py on digits8, shared by the distillation and validation tests."""
    from _train_helpers import train_teacher # pylint: disable=import-outside-toplevel
    return train_teacher(tmp_path_factory.mktemp('teacher'), digits8)

@pytest.fixture
def one_thread():
    """Tiny networks run several times faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
