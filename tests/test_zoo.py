"""The released model zoo by name: downloads from a local HTTP server on 127.0.0.1 only (started and stopped here)."""
import http.server
import json
import os
import threading
import types

import pytest
import torch

import eval_zeroshot
import models
import utils
import zoo

HERE = os.path.dirname(os.path.abspath(__file__))


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves the fixture bytes at /<anything>.pt; /trunc/... announces them all but sends half; /missing/... is 404."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        data = self.server.files.get(self.path, self.server.payload)
        if self.path.startswith('/missing/'):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2] if self.path.startswith('/trunc/') else data)

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def server(tmp_path):
    """A tiny checkpoint served from 127.0.0.1: .url (base URL), .requests (paths asked for), .payload (the bytes),
    .files (path -> other bytes to serve there)."""
    ckpt = tmp_path / 'fixture.pt'
    torch.save({'state_dict': {'module.w': torch.arange(6.0)}, 'epoch': 3, 'args': {'model': 'CLIP_TINY'}}, ckpt)
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    httpd.timeout = 5
    httpd.requests, httpd.payload, httpd.files = [], ckpt.read_bytes(), {}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    try:
        yield types.SimpleNamespace(url=f'http://127.0.0.1:{httpd.server_address[1]}', requests=httpd.requests,
                                    payload=httpd.payload, files=httpd.files)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / 'cache'
    monkeypatch.setenv('SLIP_CACHE', str(folder))
    return folder


def test_released_name_downloads_once_and_a_cache_hit_makes_no_request(server, cache, monkeypatch):
    base, requests, payload = server.url, server.requests, server.payload
    monkeypatch.setattr(zoo, 'BASE_URL', f'{base}/slip/')
    path = zoo.resolve_checkpoint('slip_base_100ep', progress=False)
    assert path == str(cache / 'slip_base_100ep.pt')
    assert open(path, 'rb').read() == payload
    assert requests == ['/slip/slip_base_100ep.pt']
    # a resumed run (or any later call) finds the cached file and asks nothing
    assert zoo.resolve_checkpoint('slip_base_100ep', progress=False) == path
    ckpt = zoo.load_checkpoint('slip_base_100ep')
    assert torch.equal(ckpt['state_dict']['w'], torch.arange(6.0)) and ckpt['epoch'] == 3
    assert requests == ['/slip/slip_base_100ep.pt']
    assert sorted(os.listdir(cache)) == ['slip_base_100ep.pt']  # no temporary file left behind


def test_url_loads_through_the_safe_funnel_and_prints_progress(server, cache, capsys):
    base, requests = server.url, server.requests
    ckpt = zoo.load_checkpoint(f'{base}/runs/mine.pt')
    assert list(ckpt['state_dict']) == ['w'] and ckpt['args'] == {'model': 'CLIP_TINY'}
    (name,) = os.listdir(cache)
    assert name.endswith('_mine.pt') and len(name) == len('0123456789ab_mine.pt')  # hash prefix: no collisions
    assert f'downloading {name}: ' in capsys.readouterr().err
    assert requests == ['/runs/mine.pt']


def test_truncated_transfer_leaves_no_file_under_the_final_name(server, cache):
    base, requests, payload = server.url, server.requests, server.payload
    with pytest.raises(utils.CheckpointError, match=rf'truncated: {len(payload) // 2} of {len(payload)} bytes'):
        zoo.resolve_checkpoint(f'{base}/trunc/ckpt.pt', progress=False)
    assert os.listdir(cache) == []  # neither the final name nor the partial temporary file
    assert requests == ['/trunc/ckpt.pt']


def test_http_error_names_the_url_and_leaves_nothing(server, cache):
    base = server.url
    with pytest.raises(utils.CheckpointError, match=r"/missing/ckpt\.pt.*404"):
        zoo.resolve_checkpoint(f'{base}/missing/ckpt.pt', progress=False)
    assert os.listdir(cache) == []


def test_unknown_name_lists_the_known_ones_and_asks_nothing(server, cache):
    requests = server.requests
    with pytest.raises(utils.CheckpointError) as e:
        zoo.resolve_checkpoint('slip_huge_1ep')
    assert all(name in str(e.value) for name in zoo.RELEASED)
    with pytest.raises(utils.CheckpointError, match='slip_base_100ep'):
        zoo.load_checkpoint('slip_huge_1ep')
    assert requests == [] and not cache.exists()


def test_paths_pass_through_and_nothing_is_downloaded(server, cache, tmp_path):
    requests = server.requests
    existing = tmp_path / 'slip_base_100ep'  # a file wins over a released name
    existing.write_bytes(b'x')
    assert zoo.resolve_checkpoint(str(existing)) == str(existing)
    assert zoo.resolve_checkpoint('out/checkpoint.pt') == 'out/checkpoint.pt'  # missing paths: the loader reports
    assert zoo.resolve_checkpoint('ckpt.pt') == 'ckpt.pt'
    with pytest.raises(utils.CheckpointError, match='does not exist'):
        utils.load_checkpoint(str(tmp_path / 'nope.pt'))
    with pytest.raises(utils.CheckpointError, match='does not exist'):
        utils.load_checkpoint('slip_base_100ep')  # the low-level loader reads files only; names go through zoo
    assert requests == [] and not cache.exists()


def test_the_19_released_checkpoints_name_registered_models():
    assert len(zoo.RELEASED) == 19
    assert {'slip_base_100ep', 'clip_small_25ep', 'slip_base_cc12m_35ep', 'simclr_large_25ep'} <= set(zoo.RELEASED)
    for name, r in zoo.RELEASED.items():
        assert r.model in models.MODELS
        assert zoo.url_of(name) == f'https://dl.fbaipublicfiles.com/slip/{name}.pt'
        assert (r.zeroshot is None) == (r.method == 'simclr')


def test_readme_model_table_is_the_zoo():
    readme = open(os.path.join(HERE, '..', 'README.md')).read()
    for line in zoo.markdown_table().splitlines():
        assert line in readme, line


def test_eval_zeroshot_resume_takes_a_released_name(server, cache, monkeypatch, tmp_path):
    """End to end: --resume NAME downloads the checkpoint once and evaluates it; a second run asks nothing."""
    base, requests = server.url, server.requests
    monkeypatch.setattr(zoo, 'BASE_URL', f'{base}/slip/')
    ckpt = tmp_path / 'slip_tiny.pt'
    torch.manual_seed(0)
    torch.save({'state_dict': {f'module.{k}': v for k, v in models.create_model('SLIP_TINY').state_dict().items()},
                'args': {'model': 'SLIP_TINY'}, 'epoch': 1}, ckpt)
    server.files['/slip/slip_small_25ep.pt'] = ckpt.read_bytes()
    _, labels, templates = eval_zeroshot.load_assets()
    files = {'catalog': {'demo': {'path': '', 'type': 'demo', 'train': 'train', 'test': 'test', 'size': 8}},
             'labels': {'demo': labels['demo']}, 'templates': {'demo': templates['demo']}}
    for key, data in files.items():
        (tmp_path / f'{key}.json').write_text(json.dumps(data))
    argv = ['--resume', 'slip_small_25ep', '--datasets', 'demo', '--output-dir', str(tmp_path / 'out'), '-j', '0',
            '--device', 'cpu'] + [a for k in files for a in (f'--{k}', str(tmp_path / f'{k}.json'))]
    first = eval_zeroshot.main(eval_zeroshot.get_args_parser().parse_args(argv))
    second = eval_zeroshot.main(eval_zeroshot.get_args_parser().parse_args(argv))
    assert first == second and 0 <= first['demo'] <= 100
    assert requests == ['/slip/slip_small_25ep.pt']
