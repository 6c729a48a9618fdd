"""--download (issue 21): a released file comes whole or not at all into the download cache. A
small HTTP server on 127.0.0.1 stands in for the publishers (nothing else is ever contacted): it
answers Range requests, redirects as Hugging Face does (with the file's sha256 and size), and can
be told to cut a transfer midway, corrupt the bytes, or answer with an HTTP error."""
import hashlib
import io
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import fid
import llamagen
import sample


class Handler(BaseHTTPRequestHandler):
    """GET /hf/NAME: a redirect to /cdn/NAME with X-Linked-Etag and X-Linked-Size, as Hugging
    Face's resolve/main answers; GET /cdn/NAME or /plain/NAME: the file (no checksum), from the
    Range header's start. Each file request takes the next of server.plan: 'cut' (half the bytes,
    then the connection closes), 'corrupt' (a flipped bit), 'no range' (the whole file, whatever
    the Range) or an HTTP status; none: as asked."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get('Range')))
        kind, name = self.path.strip('/').split('/', 1)
        data = srv.files.get(name)
        if data is None:
            self.send_error(404)
            return
        if kind == 'hf':
            self.send_response(302)
            self.send_header('Location', f'/cdn/{name}')
            self.send_header('X-Linked-Etag', f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header('X-Linked-Size', str(len(data)))
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        how = srv.plan.pop(0) if srv.plan else 'whole'
        if isinstance(how, int):
            self.send_error(how)
            return
        if how == 'corrupt':
            data = bytes([data[0] ^ 1]) + data[1:]
        asked = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range') or '')
        if how == 'no range':
            asked = None
        start = int(asked[1]) if asked else 0
        body = data[start:]
        self.send_response(206 if asked else 200)
        if asked:
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        if how == 'cut':
            body = body[:len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)


@pytest.fixture
def server(monkeypatch):
    """The stand-in publisher on a free port of 127.0.0.1: .files {name: bytes}, .plan, .requests
    [(path, Range header)], .url(kind, name)."""
    for k in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY'):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv('no_proxy', '*')  # urllib asks no proxy: only 127.0.0.1 is contacted
    srv = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    srv.files, srv.plan, srv.requests = {}, [], []
    srv.url = lambda kind, name: f'http://127.0.0.1:{srv.server_port}/{kind}/{name}'
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / 'cache'
    monkeypatch.setenv(llamagen.CACHE_ENV, str(folder))
    return folder


def files_in(folder):  # every file under folder, relative to it
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, names in os.walk(folder) for f in names)


def payload(n=300_000):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n),
                         dtype=torch.uint8).numpy().tobytes()


def test_the_cache_folder_follows_xdg_and_the_override(monkeypatch, tmp_path):
    monkeypatch.delenv(llamagen.CACHE_ENV, raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert llamagen.cache_dir() == str(tmp_path / 'xdg' / 'ar-minimal')
    monkeypatch.delenv('XDG_CACHE_HOME')
    assert llamagen.cache_dir() == os.path.join(os.path.expanduser('~'), '.cache', 'ar-minimal')
    monkeypatch.setenv(llamagen.CACHE_ENV, str(tmp_path / 'mine'))
    assert llamagen.cache_dir() == str(tmp_path / 'mine')
    assert llamagen.released('npp/c2i_B_256.pt') == str(tmp_path / 'mine' / 'npp' / 'c2i_B_256.pt')


def test_a_download_is_checked_and_renamed_into_place_whole(server, cache):
    data = payload()
    server.files['c2i_B_256.pt'] = data
    path = str(cache / 'c2i_B_256.pt')
    assert llamagen.download(server.url('hf', 'c2i_B_256.pt'), path) is True  # sha256 checked
    assert open(path, 'rb').read() == data
    assert files_in(cache) == ['c2i_B_256.pt']  # no .part left
    assert [r for _, r in server.requests] == [None, None]  # the redirect, then the file


def test_an_interrupted_download_keeps_its_part_and_resumes_from_it(server, cache):
    data = payload()
    server.files['x.pt'] = data
    url = server.url('hf', 'x.pt')
    path = str(cache / 'x.pt')
    server.plan = ['cut']
    with pytest.raises(SystemExit) as e:
        llamagen.download(url, path)
    part = path + '.part'
    have = os.path.getsize(part)
    assert 0 < have < len(data) and files_in(cache) == ['x.pt.part']
    assert str(e.value) == (f'{url}: interrupted at {have} of {len(data)} bytes; {have} bytes '
                            f'kept in {part}: run again to resume')
    server.plan = [500]  # a server error meanwhile: the part stays
    with pytest.raises(SystemExit) as e:
        llamagen.download(url, path)
    assert str(e.value).startswith(f'{url}: HTTP 500 Internal Server Error; {have} bytes kept')
    assert os.path.getsize(part) == have
    assert llamagen.download(url, path) is True
    assert server.requests[-1] == ('/cdn/x.pt', f'bytes={have}-')  # resumed, through the redirect
    assert open(path, 'rb').read() == data and files_in(cache) == ['x.pt']


def test_a_server_that_ignores_the_range_starts_the_file_again(server, cache):
    data = payload()
    server.files['x.pt'] = data
    cache.mkdir()
    (cache / 'x.pt.part').write_bytes(b'bytes of an older try')
    server.plan = ['no range']
    assert llamagen.download(server.url('hf', 'x.pt'), str(cache / 'x.pt')) is True
    assert server.requests[-1] == ('/cdn/x.pt', 'bytes=21-')
    assert (cache / 'x.pt').read_bytes() == data and files_in(cache) == ['x.pt']


@pytest.mark.parametrize('kind', ['hf', 'fid prefix'])
def test_a_corrupt_download_is_removed(kind, server, cache, monkeypatch):
    data = payload()
    server.plan = ['corrupt']
    if kind == 'hf':  # the publisher's sha256 (X-Linked-Etag)
        server.files['x.pt'] = data
        url = server.url('hf', 'x.pt')
        with pytest.raises(SystemExit) as e:
            llamagen.download(url, str(cache / 'x.pt'))
    else:  # the first digits of the sha256, in the file's name, as torch.hub checks them
        server.files[fid.WEIGHTS] = data
        url = server.url('plain', fid.WEIGHTS)
        monkeypatch.setattr(fid, 'WEIGHTS_URL', url)
        monkeypatch.setattr(fid, 'WEIGHTS_SHA256', hashlib.sha256(data).hexdigest()[:8])
        monkeypatch.setenv('TORCH_HOME', str(cache.parent / 'torch'))
        monkeypatch.delenv('FID_INCEPTION', raising=False)
        with pytest.raises(SystemExit) as e:
            fid.find_weights(download=True)
    msg = str(e.value)
    assert msg.startswith(f'{url}: checksum mismatch (sha256 ') and msg.endswith('; removed')
    assert '\n' not in msg and files_in(cache) == []
    if kind == 'fid prefix':  # served whole this time: found in the cache from then on
        assert fid.find_weights(download=True) == str(cache / fid.WEIGHTS)
        assert fid.find_weights() == str(cache / fid.WEIGHTS)
        assert open(fid.find_weights(), 'rb').read() == data


def test_fid_checks_the_sha256_prefix_of_the_real_name(server, cache, monkeypatch):
    server.files[fid.WEIGHTS] = payload()  # not pytorch-fid's file: its sha256 starts otherwise
    monkeypatch.setattr(fid, 'WEIGHTS_URL', server.url('plain', fid.WEIGHTS))
    monkeypatch.setenv('TORCH_HOME', str(cache.parent / 'torch'))
    monkeypatch.delenv('FID_INCEPTION', raising=False)
    with pytest.raises(SystemExit, match=r'published 6726825d\); removed$'):
        fid.find_weights(download=True)
    assert files_in(cache) == []


def refused_url():
    """An address of 127.0.0.1 where nothing listens: a port just freed."""
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return f'http://127.0.0.1:{port}/plain/x.pt'


@pytest.mark.parametrize('error', [404, 500, 'refused'])
def test_a_server_error_gives_one_line_and_leaves_nothing(error, server, cache):
    server.files['x.pt'] = payload()
    url = server.url('plain', 'missing.pt' if error == 404 else 'x.pt')
    if error == 500:
        server.plan = [500]
    if error == 'refused':
        url = refused_url()
    with pytest.raises(SystemExit) as e:
        llamagen.download(url, str(cache / 'x.pt'))
    line = {404: f'{url}: HTTP 404 Not Found', 500: f'{url}: HTTP 500 Internal Server Error',
            'refused': f'{url}: download failed ([Errno 111] Connection refused)'}[error]
    assert str(e.value) == line and files_in(cache) == []


# --- through sample.py --official --download -----------------------------------------------------
def tiny_official(tiny_vq, **kw):
    """A GPT-tiny state dict for tiny_vq's tokens at 16 px and 10 classes, as torch.save bytes."""
    tok = llamagen.load_tokenizer(llamagen, tiny_vq)
    cfg = llamagen.Config(**llamagen.SIZES['GPT-tiny'], **llamagen.derive_config(tok, 16, 10))
    buf = io.BytesIO()
    torch.save(llamagen.Model(cfg).state_dict(), buf)
    return buf.getvalue()


def official(tiny_vq, tmp_path, name='c2i_B_256.pt'):
    return ['--official', '--method', 'llamagen', '--model', 'GPT-tiny', '--gpt-ckpt', name,
            '--vq-ckpt', tiny_vq, '--download', '--image-size', '16', '--num-classes', '10',
            '--precision', 'fp32', '--grid', str(tmp_path / 'g.png'), '--classes', '0',
            '--per-class', '1']


def test_sample_downloads_a_released_file_and_uses_it(tiny_vq, server, cache, tmp_path,
                                                      monkeypatch):
    server.files['c2i_B_256.pt'] = tiny_official(tiny_vq)
    monkeypatch.setitem(llamagen.RELEASES, 'c2i_B_256.pt', server.url('hf', 'c2i_B_256.pt'))
    sample.main(official(tiny_vq, tmp_path))
    assert (tmp_path / 'g.png').exists() and files_in(cache) == ['c2i_B_256.pt']
    asked = len(server.requests)
    os.remove(tmp_path / 'g.png')
    sample.main(official(tiny_vq, tmp_path))  # in the cache: no request
    assert (tmp_path / 'g.png').exists() and len(server.requests) == asked


def test_a_download_that_fails_the_strict_load_is_removed(tiny_vq, server, cache, tmp_path,
                                                          monkeypatch):
    buf = io.BytesIO()
    torch.save({'tok_embeddings.weight': torch.zeros(3, 2)}, buf)  # no checksum: MAR's case
    server.files['c2i_B_256.pt'] = buf.getvalue()
    url = server.url('plain', 'c2i_B_256.pt')
    monkeypatch.setitem(llamagen.RELEASES, 'c2i_B_256.pt', url)
    with pytest.raises(SystemExit) as e:
        sample.main(official(tiny_vq, tmp_path))
    msg = str(e.value)
    assert msg.startswith(f'{cache / "c2i_B_256.pt"}: not a checkpoint of this model/size: ')
    assert msg.endswith(f'(downloaded from {url}: removed)') and '\n' not in msg
    assert files_in(cache) == [] and not (tmp_path / 'g.png').exists()


def test_sample_names_the_released_files_for_an_unknown_name(tiny_vq, tmp_path, cache):
    with pytest.raises(SystemExit) as e:
        sample.main(official(tiny_vq, tmp_path, name='c2i_Q_256.pt'))
    msg = str(e.value)
    assert msg.startswith('c2i_Q_256.pt: not a released file; --download knows vq_ds16_c2i.pt, ')
    assert 'mar_base/checkpoint-last.pth' in msg and '\n' not in msg
    assert not cache.exists()


def test_without_download_a_missing_released_file_says_how_to_get_it(tiny_vq, tmp_path, cache):
    argv = [a for a in official(tiny_vq, tmp_path) if a != '--download']
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert str(e.value) == (f'--gpt-ckpt c2i_B_256.pt: no such file; it is a released one: '
                            f'--download fetches it into {cache}')
    assert not cache.exists()


def test_download_is_for_official_files(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(['--ckpt', str(tmp_path / 'last.pt'), '--download', '--grid', 'g.png'])
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        '--download fetches the official files: --official --gpt-ckpt NAME --vq-ckpt NAME')


def test_the_released_files_come_from_the_publishers_of_the_readme():
    readme = open(os.path.join(os.path.dirname(fid.__file__), 'README.md')).read()
    section = readme.split('### Official checkpoints')[1].split('## Evaluating')[0]
    for name, url in llamagen.RELEASES.items():
        assert url.split('?')[0].endswith('/' + os.path.basename(name)), name
        hf = re.fullmatch(r'https://huggingface.co/([^/]+/[^/]+)/resolve/main/[^/]+', url)
        assert (f'HF {hf[1]}' if hf else 'Dropbox links in LTH14/mar') in section, name
    assert len(llamagen.RELEASES) == 30  # the 26 generators of the table and 4 tokenizers
