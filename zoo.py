"""The released SLIP model zoo by name: name -> URL and published ImageNet figures, and a download cache.

``resolve_checkpoint(spec)`` turns what a user passed to ``--resume`` / ``--pretrained`` / ``--finetune`` into a local
file: a path is returned as it is; a released name (``slip_base_100ep``) or an ``http(s)://`` URL is downloaded once
into ``$SLIP_CACHE`` (default ``~/.cache/slip``) and the cached file returned. Nothing is downloaded otherwise.
A download goes to a temporary file in the cache folder, is checked against the server's Content-Length and only then
renamed to its final name, so a killed or truncated transfer never leaves a file under that name.
``load_checkpoint(spec)`` resolves, then reads the file like any other through ``utils.load_checkpoint``
(``torch.load(weights_only=True)`` with an allow-list). This module builds on ``utils``, never the reverse.

Figures: ImageNet-1k zero-shot / linear / fine-tuned top-1 as published in the SLIP README (SimCLR has no zero-shot).
"""
import hashlib
import http.client
import os
import sys
import time
import urllib.parse
import urllib.request
from typing import Any, Dict, NamedTuple, Optional

import checkpoints
import utils

BASE_URL = 'https://dl.fbaipublicfiles.com/slip/'


class Released(NamedTuple):
    data: str  # pre-training data
    method: str
    model: str  # our registry name
    epochs: int
    zeroshot: Optional[float]
    linear: float
    finetuned: float


_SIZES = {'small': 'VITS16', 'base': 'VITB16', 'large': 'VITL16'}
_YFCC = {  # size -> rows (method, epochs, zero-shot, linear, fine-tuned)
    'small': [('clip', 25, 32.7, 59.3, 78.2), ('simclr', 25, None, 58.1, 79.9), ('slip', 25, 38.3, 66.4, 80.3),
              ('slip', 50, 39.3, 67.6, 80.7), ('slip', 100, 39.5, 68.3, 80.7)],
    'base': [('clip', 25, 37.6, 66.5, 80.5), ('simclr', 25, None, 64.0, 82.5), ('slip', 25, 42.8, 72.1, 82.6),
             ('slip', 50, 44.1, 73.0, 82.9), ('slip', 100, 45.0, 73.6, 83.4)],
    'large': [('clip', 25, 40.4, 70.5, 81.0), ('simclr', 25, None, 66.7, 84.0), ('slip', 25, 46.2, 76.0, 84.2),
              ('slip', 50, 47.4, 75.8, 84.7), ('slip', 100, 47.9, 75.1, 84.8)],
}
_CC = [('cc3m', 'clip', 40, 17.1, 53.3, 79.5), ('cc3m', 'slip', 40, 23.0, 65.4, 81.4),
       ('cc12m', 'clip', 35, 36.5, 69.0, 82.1), ('cc12m', 'slip', 35, 40.7, 73.7, 83.1)]


def _table() -> Dict[str, Released]:
    out = {}
    for size, rows in _YFCC.items():
        for method, ep, zs, lin, ft in rows:
            out[f'{method}_{size}_{ep}ep'] = Released('yfcc15m', method, f'{method.upper()}_{_SIZES[size]}', ep, zs,
                                                      lin, ft)
    for data, method, ep, zs, lin, ft in _CC:
        out[f'{method}_base_{data}_{ep}ep'] = Released(data, method, f'{method.upper()}_VITB16', ep, zs, lin, ft)
    return out


RELEASED: Dict[str, Released] = _table()  # the 19 checkpoints of the SLIP README, in its order


def url_of(name: str) -> str:
    if name not in RELEASED:
        raise utils.CheckpointError(f'unknown released checkpoint {name!r}; known: {", ".join(RELEASED)}')
    return f'{BASE_URL}{name}.pt'


def cache_dir() -> str:
    return os.environ.get('SLIP_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'slip')


def is_url(spec: str) -> bool:
    return spec.startswith(('https://', 'http://'))


def _cache_name(url: str) -> str:
    """A released file keeps its own name; any other URL gets a hash prefix so equal basenames never collide."""
    base = os.path.basename(urllib.parse.urlparse(url).path) or 'checkpoint.pt'
    if url == f'{BASE_URL}{base}':
        return base
    return f'{hashlib.sha256(url.encode()).hexdigest()[:12]}_{base}'


def _progress(name: str, done: int, total: Optional[int], final: bool = False) -> None:
    mb = done / 2 ** 20
    text = f'{mb:.1f}/{total / 2 ** 20:.1f} MB ({100 * done / max(total, 1):.0f}%)' if total else f'{mb:.1f} MB'
    sys.stderr.write(f'\rdownloading {name}: {text}' + ('\n' if final else ''))
    sys.stderr.flush()


def download(url: str, path: str, timeout: float = 60.0, progress: bool = True) -> str:
    """Fetch ``url`` to ``path`` atomically; the size must equal Content-Length when the server sends one.

    Raises:
        utils.CheckpointError: naming the URL on an HTTP error or a transfer shorter / longer than announced.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    name, done, total = os.path.basename(path), 0, None
    with checkpoints.atomic_write(path) as f:  # a failed or short download leaves no file under the final name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                length = response.headers.get('Content-Length')
                total = int(length) if length and length.isdigit() else None
                last = 0.0
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if progress and time.monotonic() - last > 0.5:
                        _progress(name, done, total)
                        last = time.monotonic()
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeout, IncompleteRead
            raise utils.CheckpointError(f'download of {url!r} failed after {done} bytes: {e!r}') from e
        if total is not None and done != total:
            raise utils.CheckpointError(f'download of {url!r} is truncated: {done} of {total} bytes received')
        if progress:
            _progress(name, done, total, final=True)
    return path


def _fetch(url: str, progress: bool) -> str:
    path = os.path.join(cache_dir(), _cache_name(url))
    if os.path.isfile(path):  # complete by construction: only a verified download is ever renamed to this name
        return path
    utils.logger.info('downloading %s to %s', url, path)
    return download(url, path, progress=progress)


def resolve_checkpoint(spec: str, progress: bool = True) -> str:
    """A local path for a checkpoint given as a path, a released name or an http(s) URL (see the module docstring).

    An existing path wins over a name. A missing path with a folder or a file extension is returned unchanged (the
    loader reports it missing); a bare word that is neither a file nor a released name raises, listing the names.
    In a process group rank 0 downloads first; the other ranks then find the file in the cache.
    """
    spec = os.fspath(spec)
    if not spec or os.path.exists(spec):
        return spec
    if is_url(spec):
        url = spec
    elif spec in RELEASED:
        url = url_of(spec)
    elif os.sep in spec or '/' in spec or os.path.splitext(spec)[1]:
        return spec
    else:
        raise utils.CheckpointError(f'{spec!r} is not a file, an http(s) URL or a released checkpoint name; '
                                    f'known names: {", ".join(RELEASED)}')
    if not utils.is_dist_avail_and_initialized():
        return _fetch(url, progress)
    path, error = None, None
    if utils.is_main_process():
        try:
            path = _fetch(url, progress)
        except utils.CheckpointError as e:  # reach the barrier anyway, so the other ranks do not wait forever
            error = e
    utils.barrier()
    if error is not None:
        raise error
    return path or _fetch(url, progress=False)


def load_checkpoint(spec: str, map_location: Any = 'cpu', progress: bool = True) -> Dict[str, Any]:
    """``utils.load_checkpoint`` of a checkpoint given as a path, a released name or an http(s) URL: what the stage
    scripts' --resume / --pretrained / --finetune / --checkpoint take.

    Raises:
        utils.CheckpointError: an unknown name, a failed download, or a file the safe loader refuses.
    """
    return utils.load_checkpoint(resolve_checkpoint(spec, progress), map_location)


def markdown_table() -> str:
    """The README's model-zoo table, generated from RELEASED (tests check the README holds it)."""
    rows = ['| name | data | model | epochs | 0-shot | linear | fine-tuned | URL |',
            '|---|---|---|---|---|---|---|---|']
    for name, r in RELEASED.items():
        zs = '-' if r.zeroshot is None else f'{r.zeroshot:.1f}'
        rows.append(f'| `{name}` | {r.data.upper()} | {r.model} | {r.epochs} | {zs} | {r.linear:.1f} | '
                    f'{r.finetuned:.1f} | {url_of(name)} |')
    return '\n'.join(rows)
