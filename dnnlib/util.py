"""EasyDict, files and URLs with a checksummed download cache, atomic writes, run directories, objects by class
name, log-file teeing, and the scripts' helpers for user input."""

import contextlib
import hashlib
import importlib
import io
import os
import re
import sys
import tempfile
import time
import urllib.parse

#----------------------------------------------------------------------------

class EasyDict(dict):
    """A dict whose items can also be read and written as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]

#----------------------------------------------------------------------------

class Logger:
    """Copies everything written to stdout and stderr into a log file."""

    def __init__(self, file_name=None, file_mode='a', should_flush=True): # file_name=None: no log file.
        self.file = open(file_name, file_mode) if file_name is not None else None
        self.should_flush = should_flush
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = self

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self.close()

    def write(self, text):
        if isinstance(text, bytes):
            text = text.decode()
        if not text:
            return
        if self.file is not None:
            self.file.write(text)
        self.stdout.write(text)
        if self.should_flush:
            self.flush()

    def flush(self):
        if self.file is not None:
            self.file.flush()
        self.stdout.flush()

    def isatty(self):
        return False

    def close(self):
        self.flush()
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        if self.file is not None:
            self.file.close()
            self.file = None

#----------------------------------------------------------------------------
# User input of the scripts.

@contextlib.contextmanager
def user_errors():
    """Turn a library ValueError into a click error without traceback."""
    import click # pylint: disable=import-outside-toplevel
    try:
        yield
    except ValueError as err:
        raise click.ClickException(str(err)) from err

def parse_int_list(text):
    """'1,2,5-7' -> [1, 2, 5, 6, 7]; a list or None passes through."""
    if text is None or isinstance(text, list):
        return text
    text, values = str(text), []
    for part in text.split(','):
        where = f'"{part}" in "{text}"' if ',' in text else f'"{text}"'
        m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if m is None:
            raise ValueError(f'{where} is neither a non-negative integer nor a range A-B; write e.g. 1,2,5-7.')
        lo, hi = int(m.group(1)), int(m.group(m.lastindex))
        if hi < lo:
            raise ValueError(f'{where} is an empty range; write it as {hi}-{lo}.')
        values += range(lo, hi + 1)
    return values

#----------------------------------------------------------------------------
# Files and run directories.

def write_atomic(path, write_fn):
    """Write a binary file with `write_fn(f)` to `<path>.tmp-<pid>`, then rename it."""
    temp_path = f'{path}.tmp-{os.getpid()}'
    try:
        with open(temp_path, 'wb') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise

def remove_stale_temp_files(folder):
    """Remove the write_atomic() temp files in `folder` whose process is gone; returns their names."""
    removed = []
    for name in (os.listdir(folder) if os.path.isdir(folder) else []):
        match = re.fullmatch(r'.+\.tmp-(\d+)', name)
        if match and int(match.group(1)) != os.getpid():
            try:
                os.kill(int(match.group(1)), 0)
            except ProcessLookupError:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except PermissionError:
                pass
    return removed

def check_writable(path, name, folder=False):
    """ValueError unless output `path` of `name` (folder=True: a folder) can be made; a temp file probes its folder."""
    if not folder and os.path.isdir(path):
        raise ValueError(f'{name}={path} is a folder; pass the path of a file.')
    probe = os.path.abspath(path) if folder else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f'{name}={path} cannot be created: "{probe}" is a file, not a folder; choose another path.')
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix='.write-test-'):
            pass
    except OSError as e:
        raise ValueError(f'{name}={path} cannot be written in "{probe}" ({e.strerror}); choose another path.') from e

def next_run_id(outdir):
    """One above the largest id that starts a name in outdir (0 for none)."""
    names = os.listdir(outdir) if os.path.isdir(outdir) else []
    ids = [int(m.group()) for m in (re.match(r'^\d+', name) for name in names) if m]
    return max(ids, default=-1) + 1

def next_run_dir(outdir, desc):
    return os.path.join(outdir, f'{next_run_id(outdir):05d}-{desc}')

def claim_run_dir(outdir, desc):
    """Create and return the next run directory, its id claimed by exclusive creation in `outdir/.run-ids`."""
    claims = os.path.join(outdir, '.run-ids')
    os.makedirs(claims, exist_ok=True)
    run_id = next_run_id(outdir)
    while True:
        try:
            os.close(os.open(os.path.join(claims, f'{run_id:05d}'), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            path = os.path.join(outdir, f'{run_id:05d}-{desc}')
            os.makedirs(path)
            return path
        except FileExistsError:
            run_id += 1

def format_time(seconds):
    """E.g. '45s', '3m 05s', '2h 10m 00s', '1d 02h 00m'."""
    s = int(round(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // 3600}h {(s // 60) % 60:02d}m {s % 60:02d}s'
    return f'{s // 86400}d {(s // 3600) % 24:02d}h {(s // 60) % 60:02d}m'

#----------------------------------------------------------------------------
# Objects by name.

def get_module_from_obj_name(obj_name):
    """Split 'pkg.module.attr.sub' into the longest importable module and the rest."""
    parts = obj_name.split('.')
    for i in range(len(parts), 0, -1):
        module_name = '.'.join(parts[:i])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and not module_name.startswith(err.name) and not err.name.startswith(module_name):
                raise # A module that exists failed on an import of its own.
            continue
        rest = '.'.join(parts[i:])
        try:
            get_obj_from_module(module, rest)
        except AttributeError:
            continue
        return module, rest
    raise ValueError(f'Cannot find "{obj_name}"; give a fully qualified name such as "training.networks.EDMPrecond".')

def get_obj_from_module(module, obj_name):
    obj = module
    for part in obj_name.split('.') if obj_name else []:
        obj = getattr(obj, part)
    return obj

def get_obj_by_name(name):
    return get_obj_from_module(*get_module_from_obj_name(name))

def call_func_by_name(*args, func_name=None, **kwargs):
    func = get_obj_by_name(func_name)
    assert callable(func), func_name
    return func(*args, **kwargs)

def construct_class_by_name(*args, class_name=None, **kwargs):
    return call_func_by_name(*args, func_name=class_name, **kwargs)

#----------------------------------------------------------------------------
# URLs, files and the download cache.

def make_cache_dir_path(*paths):
    """A path inside the download cache: $DNNLIB_CACHE_DIR, else ~/.cache/dnnlib."""
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    if 'HOME' in os.environ:
        return os.path.join(os.environ['HOME'], '.cache', 'dnnlib', *paths)
    return os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib', *paths)

def is_url(obj, allow_file_urls=False):
    if not isinstance(obj, str) or '://' not in obj:
        return False
    if allow_file_urls and obj.startswith('file://'):
        return True
    try:
        res = urllib.parse.urlparse(obj)
    except ValueError:
        return False
    return res.scheme in ('http', 'https') and bool(res.netloc) and '.' in res.netloc

def sha256_of_file(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()

def _cache_entry_is_valid(path):
    try:
        with open(path + '.sha256', 'r', encoding='ascii') as f:
            expected = f.read().strip()
        return re.fullmatch(r'[0-9a-f]{64}', expected) is not None and sha256_of_file(path) == expected
    except (OSError, UnicodeDecodeError):
        return False

def _download(url, num_attempts, verbose):
    """Fetch a URL into memory, retrying 5xx, 429 and broken transfers; no network or another 4xx fails at once."""
    import requests # pylint: disable=import-outside-toplevel
    import urllib3 # pylint: disable=import-outside-toplevel
    fix = 'download it by other means and pass the local file path instead'
    last_error = fatal = None
    for attempt in range(num_attempts):
        if verbose:
            print(f'Downloading {url} ...', end='', file=sys.stderr, flush=True)
        try:
            with requests.Session() as session, session.get(url, timeout=60) as res:
                res.raise_for_status()
                if len(res.content) == 0:
                    raise IOError('empty response')
                return res.content
        except requests.exceptions.ConnectionError as err:
            reason = getattr(err.args[0], 'reason', None) if err.args else None
            if isinstance(err, requests.exceptions.ConnectTimeout) or \
                    isinstance(reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)):
                fatal = IOError(f'Could not download "{url}": no network ({err}); {fix}.')
            last_error = err
        except requests.exceptions.HTTPError as err:
            status = err.response.status_code if err.response is not None else 0
            if status < 500 and status != 429:
                fatal = IOError(f'Could not download "{url}" ({err}); {fix}.')
            last_error = err
        except Exception as err: # pylint: disable=broad-except
            last_error = err
        if verbose:
            print(' failed' if fatal else f' failed ({attempt + 1}/{num_attempts}): {last_error}', file=sys.stderr,
                flush=True)
        if fatal is not None:
            raise fatal from last_error
        if attempt + 1 < num_attempts:
            time.sleep(min(2 ** attempt, 10))
    raise IOError(f'Could not download "{url}" ({last_error}); {fix}.')

def open_url(url_or_path, cache_dir=None, num_attempts=10, verbose=True, return_filename=False, cache=True,
    allow_http=False):
    """Open a path or URL as a binary file; downloads are cached with a `.sha256` checksum, reused if it matches."""
    assert num_attempts >= 1 and (cache or not return_filename)
    if not is_url(url_or_path):
        path = str(url_or_path)
        if path.startswith('file://'):
            path = urllib.parse.unquote(urllib.parse.urlparse(path).path)
            path = path[1:] if re.match(r'^/[A-Za-z]:/', path) else path # file:///C:/... on Windows.
        if not os.path.isfile(path):
            raise ValueError(f'"{url_or_path}" is neither an existing file nor an http(s):// or file:// URL; '
                'check the path.')
        return path if return_filename else open(path, 'rb')
    url = url_or_path
    if urllib.parse.urlparse(url).scheme == 'http' and not (allow_http or os.environ.get('DNNLIB_ALLOW_HTTP') == '1'):
        raise ValueError(f'"{url}" is plain http, which anyone on the way can alter; use its https:// address, '
            'or opt in with DNNLIB_ALLOW_HTTP=1 (allow_http=True).')

    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    url_md5 = hashlib.md5(url.encode('utf-8')).hexdigest()
    untrusted = None
    if cache:
        names = [f for f in (os.listdir(cache_dir) if os.path.isdir(cache_dir) else []) if f.startswith(url_md5 + '_')]
        hits = sorted(f for f in names if not f.endswith('.sha256') and '.tmp-' not in f)
        if len(hits) == 1:
            path = os.path.join(cache_dir, hits[0])
            if _cache_entry_is_valid(path):
                return path if return_filename else open(path, 'rb')
            untrusted = path

    try:
        data = _download(url, num_attempts=num_attempts, verbose=verbose)
    except IOError as err:
        if untrusted is not None:
            raise ValueError(f'The cached "{untrusted}" of "{url}" has no matching checksum, so it is not used, and '
                f'downloading it again failed ({str(err).rstrip(".")}); delete it, or pass a local copy.') from err
        raise
    if verbose:
        print(' done', file=sys.stderr, flush=True)

    if cache:
        safe_name = re.sub(r'[^0-9a-zA-Z._-]', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'file'
        path = os.path.join(cache_dir, url_md5 + '_' + safe_name)
        os.makedirs(cache_dir, exist_ok=True)
        write_atomic(path, lambda f: f.write(data))
        write_atomic(path + '.sha256', lambda f: f.write(hashlib.sha256(data).hexdigest().encode('ascii') + b'\n'))
        if return_filename:
            return path
    return io.BytesIO(data)

#----------------------------------------------------------------------------
