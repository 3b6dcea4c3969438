"""dnnlib.util: EasyDict, open_url and its cache (http opt-in, checksums, the
quick offline failure), objects by name, Logger, format_time."""

import hashlib
import http.server
import os
import socket
import sys
import threading
import time

import pytest

import dnnlib
from dnnlib import util

#----------------------------------------------------------------------------

def test_easydict_attribute_access():
    d = util.EasyDict(a=1)
    d.b = 2
    assert d['b'] == 2 and d.a == 1
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        _ = d.missing
    assert dnnlib.EasyDict is util.EasyDict

def test_format_time():
    assert util.format_time(5) == '5s'
    assert util.format_time(65) == '1m 05s'
    assert util.format_time(3 * 3600 + 7 * 60 + 9) == '3h 07m 09s'
    assert util.format_time(2 * 86400 + 5 * 3600 + 60) == '2d 05h 01m'

def test_objects_by_name():
    assert util.get_obj_by_name('os.path.join') is os.path.join
    assert util.call_func_by_name('a', 'b', func_name='os.path.join') == os.path.join('a', 'b')
    d = util.construct_class_by_name(class_name='dnnlib.util.EasyDict', x=3)
    assert isinstance(d, util.EasyDict) and d.x == 3
    with pytest.raises(ValueError, match='no_such_module'):
        util.get_obj_by_name('no_such_module.Thing')
    with pytest.raises(AssertionError):
        util.call_func_by_name(func_name='os.sep')

#----------------------------------------------------------------------------

def test_open_url_local_and_file_url(tmp_path):
    path = tmp_path / 'a b.bin'
    path.write_bytes(b'hello')
    with util.open_url(str(path)) as f:
        assert f.read() == b'hello'
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'hello'
    assert util.open_url(path.as_uri(), return_filename=True) == str(path)
    with pytest.raises(ValueError, match='neither an existing file'):
        util.open_url(str(tmp_path / 'missing.pkl'))
    with pytest.raises(ValueError, match='neither an existing file'):
        util.open_url((tmp_path / 'missing.pkl').as_uri())

@pytest.fixture
def http_server(tmp_path, monkeypatch):
    """A loopback HTTP server serving tmp_path/www, counting the requests, with
    plain http opted in by DNNLIB_ALLOW_HTTP=1. A path in `failures` is
    answered with 503 that many times first."""
    root = tmp_path / 'www'
    root.mkdir()
    hits, failures = [], {}
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)
        def do_GET(self):
            hits.append(self.path)
            if failures.get(self.path, 0) > 0:
                failures[self.path] -= 1
                self.send_error(503)
                return
            super().do_GET()
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv('DNNLIB_ALLOW_HTTP', '1')
    # A dotted host name is what is_url() accepts as an http URL.
    yield root, f'http://127.0.0.1:{server.server_address[1]}', hits, failures
    server.shutdown()
    server.server_close()

def test_open_url_http_download_and_cache(tmp_path, http_server):
    root, base, hits, _failures = http_server
    (root / 'net.pkl').write_bytes(b'x' * 1000)
    cache_dir = tmp_path / 'cache'
    with util.open_url(f'{base}/net.pkl', cache_dir=str(cache_dir), verbose=False) as f:
        assert f.read() == b'x' * 1000
    files = sorted(os.listdir(cache_dir))
    assert len(files) == 2 and files[0].endswith('_net.pkl') and files[1] == files[0] + '.sha256' # The file and its checksum.
    n = len(hits)
    fname = util.open_url(f'{base}/net.pkl', cache_dir=str(cache_dir), verbose=False, return_filename=True)
    assert len(hits) == n # Served from the cache.
    assert open(fname, 'rb').read() == b'x' * 1000
    with util.open_url(f'{base}/net.pkl', cache_dir=str(cache_dir), verbose=False, cache=False) as f:
        assert f.read() == b'x' * 1000
    assert len(hits) == n + 1

def test_open_url_env_cache_dir(tmp_path, http_server, monkeypatch):
    root, base, _hits, _failures = http_server
    (root / 'stats.npz').write_bytes(b'abc')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'envcache'))
    util.open_url(f'{base}/stats.npz', verbose=False).close()
    assert len([f for f in os.listdir(tmp_path / 'envcache' / 'downloads') if not f.endswith('.sha256')]) == 1

def test_open_url_download_failure_is_clear(tmp_path, http_server):
    _root, base, hits, _failures = http_server
    start = time.monotonic()
    with pytest.raises(IOError, match='Could not download .*missing.pkl.*local file path'):
        util.open_url(f'{base}/missing.pkl', cache_dir=str(tmp_path / 'c'), num_attempts=10, verbose=False)
    assert hits == ['/missing.pkl'] and time.monotonic() - start < 1 # A 404 is final: no retries.
    assert not os.path.exists(tmp_path / 'c') or os.listdir(tmp_path / 'c') == []

def test_open_url_retries_server_errors(tmp_path, http_server):
    root, base, hits, failures = http_server
    (root / 'busy.pkl').write_bytes(b'late')
    failures['/busy.pkl'] = 1
    with util.open_url(f'{base}/busy.pkl', cache_dir=str(tmp_path / 'c'), num_attempts=2, verbose=False) as f:
        assert f.read() == b'late'
    assert hits == ['/busy.pkl', '/busy.pkl']

def test_download_messages_end_their_line(tmp_path, http_server, capsys):
    root, base, _hits, failures = http_server
    with pytest.raises(IOError):
        util.open_url(f'{base}/missing.pkl', cache_dir=str(tmp_path / 'c'), num_attempts=3)
    assert capsys.readouterr().err == f'Downloading {base}/missing.pkl ... failed\n' # A 404 is final.
    (root / 'busy.pkl').write_bytes(b'late')
    for num_failures, last in [(1, 'done'), (2, 'failed (2/2): 503 Server Error')]:
        failures['/busy.pkl'] = num_failures
        try:
            util.open_url(f'{base}/busy.pkl', cache_dir=str(tmp_path / 'c'), num_attempts=2, cache=False).close()
        except IOError:
            assert num_failures == 2
        err = capsys.readouterr().err
        assert err.endswith('\n') and err.splitlines()[0].startswith(f'Downloading {base}/busy.pkl ... failed (1/2): 503 Server Error')
        assert len(err.splitlines()) == 2 and err.splitlines()[1].startswith(f'Downloading {base}/busy.pkl ... {last}'), err

def test_plain_http_needs_an_opt_in(tmp_path, http_server, monkeypatch):
    root, base, hits, _failures = http_server
    (root / 'net.pkl').write_bytes(b'abc')
    monkeypatch.delenv('DNNLIB_ALLOW_HTTP')
    with pytest.raises(ValueError, match=r'^".*/net.pkl" is plain http, .*; use its https:// address, or opt in with DNNLIB_ALLOW_HTTP=1 \(allow_http=True\)\.$'):
        util.open_url(f'{base}/net.pkl', cache_dir=str(tmp_path / 'c'), verbose=False)
    assert hits == [] and not os.path.exists(tmp_path / 'c')
    with util.open_url(f'{base}/net.pkl', cache_dir=str(tmp_path / 'c'), verbose=False, allow_http=True) as f:
        assert f.read() == b'abc'
    monkeypatch.setenv('DNNLIB_ALLOW_HTTP', '1')
    assert open(util.open_url(f'{base}/net.pkl', cache_dir=str(tmp_path / 'c'), verbose=False, return_filename=True), 'rb').read() == b'abc'
    assert len(hits) == 1 # The second call came from the cache.

def unused_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]

def test_cached_downloads_are_used_only_with_their_checksum(tmp_path, http_server):
    root, base, hits, _failures = http_server
    (root / 'net.pkl').write_bytes(b'good')
    cache_dir = str(tmp_path / 'cache')
    path = util.open_url(f'{base}/net.pkl', cache_dir=cache_dir, verbose=False, return_filename=True)
    assert open(path + '.sha256').read().strip() == util.sha256_of_file(path) and len(hits) == 1

    # A changed file, or one without its checksum, is downloaded again.
    with open(path, 'wb') as f:
        f.write(b'evil')
    with util.open_url(f'{base}/net.pkl', cache_dir=cache_dir, verbose=False) as f:
        assert f.read() == b'good'
    os.remove(path + '.sha256')
    with util.open_url(f'{base}/net.pkl', cache_dir=cache_dir, verbose=False) as f:
        assert f.read() == b'good'
    assert len(hits) == 3 and os.path.isfile(path + '.sha256')
    assert util.open_url(f'{base}/net.pkl', cache_dir=cache_dir, verbose=False, return_filename=True) == path and len(hits) == 3

    # Offline, an untrusted cached file is an error, not a silent use.
    offline_url = f'http://127.0.0.1:{unused_port()}/net.pkl'
    target = os.path.join(cache_dir, hashlib.md5(offline_url.encode()).hexdigest() + '_net.pkl')
    with open(target, 'wb') as f:
        f.write(b'evil')
    with open(target + '.sha256', 'w') as f:
        f.write(hashlib.sha256(b'good').hexdigest() + '\n')
    with pytest.raises(ValueError, match=r'has no matching checksum.* so it is not used, and downloading it again failed .*no network'):
        util.open_url(offline_url, cache_dir=cache_dir, verbose=False)

def test_offline_download_fails_at_once(tmp_path, monkeypatch):
    import requests # pylint: disable=import-outside-toplevel,unused-import
    url = f'http://127.0.0.1:{unused_port()}/net.pkl' # Nothing listens: connection refused, as with no network.
    start = time.monotonic()
    with pytest.raises(IOError, match=r'^Could not download ".*": no network \(.*\); download it by other means and pass the local file path instead\.$'):
        util.open_url(url, cache_dir=str(tmp_path / 'c'), num_attempts=10, verbose=False, allow_http=True)
    assert time.monotonic() - start < 1 # The retries would sleep 1 s after the first attempt.
    monkeypatch.setattr(time, 'sleep', lambda _s: pytest.fail('a refused connection must not be retried'))
    with pytest.raises(IOError, match='no network'):
        util.open_url(url, cache_dir=str(tmp_path / 'c'), num_attempts=10, verbose=False, allow_http=True)

#----------------------------------------------------------------------------

def test_write_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = str(tmp_path / 'file.bin')
    util.write_atomic(path, lambda f: f.write(b'old'))
    def failing(f):
        f.write(b'partial')
        raise RuntimeError('disk full')
    with pytest.raises(RuntimeError):
        util.write_atomic(path, failing)
    assert open(path, 'rb').read() == b'old' and os.listdir(tmp_path) == ['file.bin']

def test_run_directories_take_the_next_free_id(tmp_path):
    (tmp_path / '00007-old').mkdir()
    assert util.next_run_dir(str(tmp_path), 'x') == str(tmp_path / '00008-x')
    first = util.claim_run_dir(str(tmp_path), 'x')
    (tmp_path / '00009-other').mkdir() # Taken by another run meanwhile.
    second = util.claim_run_dir(str(tmp_path), 'x')
    assert (first, second) == (str(tmp_path / '00008-x'), str(tmp_path / '00010-x')) and os.path.isdir(second)
    assert util.claim_run_dir(str(tmp_path / 'new'), 'y') == str(tmp_path / 'new' / '00000-y')
    (tmp_path / '.run-ids' / '00011').touch() # Id 11 claimed by a run that has not made its directory yet.
    assert util.claim_run_dir(str(tmp_path), 'z') == str(tmp_path / '00012-z')

#----------------------------------------------------------------------------

def test_logger_tees_stdout_and_stderr(tmp_path, capfd):
    log = tmp_path / 'log.txt'
    with util.Logger(file_name=str(log), file_mode='a'):
        print('to stdout')
        print('to stderr', file=sys.stderr)
    print('after')
    text = log.read_text()
    assert 'to stdout' in text and 'to stderr' in text and 'after' not in text
    assert 'to stdout' in capfd.readouterr().out

#----------------------------------------------------------------------------
