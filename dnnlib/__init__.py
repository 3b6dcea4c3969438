"""Small general-purpose utilities shared by the scripts and the library."""

from .util import EasyDict, make_cache_dir_path
