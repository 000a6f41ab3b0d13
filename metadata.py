"""Pre-training metadata (SLIP_REFERENCE §3.1, §10): read without running code, validate, hold as flat arrays, cache.

The five SLIP formats (``yfcc15m`` pickle, ``cc3m`` / ``cc12m`` npy object arrays, ``coco`` and ``redcaps`` json)
are parsed and validated once, then held as a ``CompactMetadata``: a few flat numpy arrays (integer ids, or the UTF-8
bytes of every path string concatenated with an offsets array; the captions likewise, with a second offsets level
when the number of captions per image varies). There are no per-record Python objects, so a forked DataLoader
worker reading records writes no reference counts and copies no pages; a record is decoded to ``str`` only when a
sample is built.

With a cache folder (main.py ``--metadata-cache``) the first process to need a metadata file writes its compact
form to ``<folder>/<name>.<format>.<hash of the path>.slipmeta`` (under a lock, to a temporary file that is fsynced
and renamed into place), and every process memory-maps it, so one node holds one copy in its page cache. The file
records the source's real path, size and modification time, the format and ``CACHE_VERSION``; a file whose record
differs (the source changed), that is truncated, or whose checksum fails is never used: it is rebuilt.

Pickles (``yfcc15m.pkl`` and the payload of an npy object array) are read with ``RestrictedUnpickler``, which admits
only what these formats contain (builtin containers, str, int, and numpy's array and scalar reconstruction), so a
metadata file cannot run code.
"""
import builtins
import codecs
import fcntl
import hashlib
import json
import logging
import mmap
import os
import pickle
import re
import struct
import time
import zlib
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import checkpoints
import progress

logger = logging.getLogger('slip')
FORMATS = ('yfcc15m', 'cc3m', 'cc12m', 'coco', 'redcaps')
CACHE_VERSION = 1
CACHE_SUFFIX = '.slipmeta'
_MAGIC, _END_MAGIC, _ALIGN = b'SLIPMETA', b'SLIPEND\0', 64
_TRAILER = struct.Struct('<QQ8s')  # header offset, header length, end magic
_TEXT = ('utf-8', 'surrogatepass')  # json may hold lone surrogates: they round-trip exactly
PACK_CHUNK = 1 << 18  # records packed at a time while a cache is built (each chunk advances its progress line)


# ----------------------------------------------------------------------------------------------------------------
# Reading without code execution
# ----------------------------------------------------------------------------------------------------------------
class UnsafeMetadata(ValueError):
    """A metadata pickle that references a global these formats never hold (it is refused, nothing is run)."""


def _numpy_globals() -> Dict[Tuple[str, str], Any]:
    """numpy's reconstruction helpers, taken from public objects' own pickling (no private module imported)."""
    rebuild, scalar, frombuffer = np.zeros(0).__reduce__()[0], np.int64(0).__reduce__()[0], \
        np.arange(1).__reduce_ex__(5)[0]
    allowed: Dict[Tuple[str, str], Any] = {('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype}
    for core in ('numpy.core', 'numpy._core'):  # numpy 1 and numpy 2 pickles name the module differently
        allowed[(f'{core}.multiarray', '_reconstruct')] = rebuild
        allowed[(f'{core}.multiarray', 'scalar')] = scalar
        allowed[(f'{core}.numeric', '_frombuffer')] = frombuffer
    return allowed


def _latin1_encode(text: str, encoding: str = 'latin1') -> bytes:
    """How protocol-2 pickles spell bytes: ``_codecs.encode(text, 'latin1')``; no other codec is reachable."""
    if encoding not in ('latin1', 'latin-1'):
        raise pickle.UnpicklingError(f'the pickle asks for codec {encoding!r}; only latin1 spells bytes')
    return codecs.encode(text, 'latin1')


_ALLOWED_GLOBALS = {**_numpy_globals(), **{('builtins', n): getattr(builtins, n)
                                           for n in ('set', 'frozenset', 'bytearray', 'complex')},
                    ('_codecs', 'encode'): _latin1_encode}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles lists, tuples, dicts, str, int, float, bytes and numpy arrays/scalars; refuses any other global."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise UnsafeMetadata(f'{self.path}: refused to load: the pickle references {module}.{name}, which a '
                                 'metadata file never holds (only lists, tuples, dicts, str, int and numpy arrays '
                                 'are admitted); nothing in it was run')
        return obj


def safe_pickle_load(path: str) -> Any:
    with open(path, 'rb') as f:
        return RestrictedUnpickler(f, path).load()


def safe_npy_load(path: str) -> np.ndarray:
    """np.load for .npy files, object arrays included, whose pickled payload goes through RestrictedUnpickler."""
    with open(path, 'rb') as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f'npy format version {version[0]}.{version[1]} is not supported (expected 1.0 or 2.0)')
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        array = RestrictedUnpickler(f, path).load()
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise ValueError(f'the pickled payload is not the {tuple(shape)} array its header announces')
    return array


# ----------------------------------------------------------------------------------------------------------------
# Parsing and validation: one Python record per image (the error messages name the file and what it should hold)
# ----------------------------------------------------------------------------------------------------------------
def _check(records: Any, path: str, expected: str, ok: Callable[[Any], bool]) -> None:
    if not isinstance(records, (list, tuple, np.ndarray)) or len(records) == 0:
        raise ValueError(f'{path}: expected {expected}; got {type(records).__name__} of length '
                         f'{len(records) if hasattr(records, "__len__") else "?"}')
    bad = next((k for k, r in enumerate(records) if not ok(r)), None)
    if bad is not None:
        raise ValueError(f'{path}: record {bad} is {str(records[bad])[:200]!r}; expected {expected}')


def _read(path: str, what: str, kind: str) -> Any:
    """Load a 'pickle', 'json' or 'npy' metadata file; any failure names the file and what it should hold."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'metadata file {path!r} not found (expected {what})')
    try:
        if kind == 'npy':
            return safe_npy_load(path)
        if kind == 'pickle':
            return safe_pickle_load(path)
        with open(path, 'rb') as f:
            return json.load(f)
    except UnsafeMetadata:
        raise
    except Exception as e:  # unpickling / json / npy errors of any kind: the file is not what it should be
        raise ValueError(f'{path}: cannot read it as {what}: {type(e).__name__}: {e}') from e


def _str_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(c, str) for c in x)


def parse_metadata(dataset: str, path: str) -> list:
    """Read and validate ``path`` as ``dataset``'s metadata; returns one Python record per image:
    yfcc15m ``(photo_id, title, description)``, cc3m/cc12m ``(path, [captions])``, coco ``(image_id, [captions])``
    (captions grouped in first-appearance order), redcaps ``(subreddit, image_id, caption)``."""
    if dataset == 'yfcc15m':
        exp = 'a non-empty list of (photo_id: int, title: str, description: str) tuples (make_dataset.py output)'
        recs = _read(path, exp, 'pickle')
        _check(recs, path, exp, lambda r: isinstance(r, (tuple, list)) and len(r) == 3 and isinstance(
            r[0], (int, np.integer)) and isinstance(r[1], str) and isinstance(r[2], str))
        return recs
    if dataset in ('cc3m', 'cc12m'):
        key = 'image_id' if dataset == 'cc3m' else 'image_name'
        exp = f"a non-empty npy array of dicts with '{key}' and 'captions' (a non-empty list of str)"
        recs = _read(path, exp, 'npy')
        _check(recs, path, exp, lambda r: isinstance(r, dict) and key in r and _str_list(r.get('captions')))
        return [(str(r[key]), list(r['captions'])) for r in recs]
    if dataset == 'coco':
        exp = "a COCO captions json: {'annotations': [{'image_id': int, 'caption': str}, ...]}"
        data = _read(path, exp, 'json')
        anns = data.get('annotations') if isinstance(data, dict) else None
        _check(anns, path, exp, lambda a: isinstance(a, dict) and isinstance(a.get('image_id'), int)
               and isinstance(a.get('caption'), str))
        grouped: Dict[int, List[str]] = {}
        for a in anns:
            grouped.setdefault(a['image_id'], []).append(a['caption'])
        return list(grouped.items())
    if dataset == 'redcaps':
        exp = "a json list of {'image_id': str, 'subreddit': str, 'caption': str} (redcaps/combine_captions.py)"
        anns = _read(path, exp, 'json')
        _check(anns, path, exp, lambda a: isinstance(a, dict) and all(
            isinstance(a.get(k), str) for k in ('image_id', 'subreddit', 'caption')))
        return [(a['subreddit'], a['image_id'], a['caption']) for a in anns]
    raise ValueError(f'unknown metadata format {dataset!r}; expected one of {", ".join(FORMATS)}')


# ----------------------------------------------------------------------------------------------------------------
# The compact form
# ----------------------------------------------------------------------------------------------------------------
def _pack_strings(strings: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """(offsets int64[n + 1], UTF-8 bytes uint8[total]): string k is bytes[offsets[k]:offsets[k + 1]]."""
    n = len(strings)
    lengths = np.fromiter(map(len, strings), np.int64, n)
    joined = ''.join(strings)
    data = joined.encode(*_TEXT)
    del joined
    if len(data) != int(lengths.sum()):  # some string is not ASCII: its byte length differs from its length
        lengths = np.fromiter((len(s.encode(*_TEXT)) for s in strings), np.int64, n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, np.frombuffer(data, np.uint8)


def _int_column(values, n: int, path: str, what: str) -> np.ndarray:
    try:
        return np.fromiter(values, np.int64, n)
    except OverflowError as e:
        raise ValueError(f'{path}: a {what} does not fit in 64 bits ({e})') from e


def _pack_captions(records: Sequence, captions_of: Callable[[Any], Sequence[str]],
                   counter: Optional[progress.Progress]) -> Tuple[np.ndarray, np.ndarray]:
    """One _pack_strings of all the records' captions (the same arrays), PACK_CHUNK records at a time: ``counter``
    counts the records as they are packed, and no string of all the captions is ever built."""
    offsets, data = [np.zeros(1, np.int64)], [np.zeros(0, np.uint8)]
    for start in range(0, len(records), PACK_CHUNK):
        part = records[start:start + PACK_CHUNK]
        off, raw = _pack_strings([c for r in part for c in captions_of(r)])
        offsets.append(off[1:] + offsets[-1][-1])  # after the bytes of the chunks before
        data.append(raw)
        if counter is not None:
            counter.update(len(part))
    return np.concatenate(offsets), np.concatenate(data)


class CompactMetadata:
    """One metadata file as flat arrays; ``self[i]`` is record i in ``parse_metadata``'s form (ids as int).

    ``arrays`` holds ``ids`` (yfcc15m, coco) or string columns ``<name>.off`` / ``<name>.data`` (``path`` for
    cc3m/cc12m; ``subreddit`` and ``image_id`` for redcaps), and the captions ``cap.off`` / ``cap.data`` with
    ``cap.rec`` (int64[n + 1], the first caption of each record) unless every record has ``per`` captions.
    """

    def __init__(self, dataset: str, arrays: Dict[str, np.ndarray], per: Optional[int], origin: Optional[str] = None,
                 key: Optional[dict] = None):
        self.dataset, self.arrays, self.per, self.origin, self.key = dataset, arrays, per, origin, key
        self._cap_off, self._cap_data = arrays['cap.off'], arrays['cap.data']
        self._rec = arrays.get('cap.rec')
        self._n = len(self._rec) - 1 if self._rec is not None else (len(self._cap_off) - 1) // per

    @classmethod
    def from_records(cls, dataset: str, records: Sequence, path: str = '<records>',
                     counter: Optional[progress.Progress] = None) -> 'CompactMetadata':
        """Pack parse_metadata's records; ``counter`` counts them as their captions are packed."""
        n, arrays = len(records), {}
        if dataset == 'yfcc15m':
            arrays['ids'] = _int_column((r[0] for r in records), n, path, 'photo_id')
            captions_of, per = (lambda r: (r[1], r[2])), 2
        elif dataset == 'redcaps':
            for k, name in enumerate(('subreddit', 'image_id')):
                arrays[f'{name}.off'], arrays[f'{name}.data'] = _pack_strings([r[k] for r in records])
            captions_of, per = (lambda r: (r[2],)), 1
        else:
            if dataset == 'coco':
                arrays['ids'] = _int_column((r[0] for r in records), n, path, 'image_id')
            else:
                arrays['path.off'], arrays['path.data'] = _pack_strings([r[0] for r in records])
            counts = np.fromiter((len(r[1]) for r in records), np.int64, n)
            captions_of, per = (lambda r: r[1]), None
            arrays['cap.rec'] = np.zeros(n + 1, np.int64)
            np.cumsum(counts, out=arrays['cap.rec'][1:])
        arrays['cap.off'], arrays['cap.data'] = _pack_captions(records, captions_of, counter)
        return cls(dataset, arrays, per)

    def __len__(self) -> int:
        return self._n

    def _string(self, name: str, i: int) -> str:
        off = self.arrays[f'{name}.off']
        return self.arrays[f'{name}.data'][off[i]:off[i + 1]].tobytes().decode(*_TEXT)

    def captions(self, i: int) -> List[str]:
        first, last = (self._rec[i], self._rec[i + 1]) if self._rec is not None else (i * self.per, (i + 1) * self.per)
        off, data = self._cap_off, self._cap_data
        return [data[off[k]:off[k + 1]].tobytes().decode(*_TEXT) for k in range(int(first), int(last))]

    def __getitem__(self, i: int) -> tuple:
        i = int(i)
        if not -self._n <= i < self._n:
            raise IndexError(f'record {i} of {self._n}')
        i %= self._n
        caps = self.captions(i)
        if self.dataset == 'yfcc15m':
            return int(self.arrays['ids'][i]), caps[0], caps[1]
        if self.dataset == 'redcaps':
            return self._string('subreddit', i), self._string('image_id', i), caps[0]
        if self.dataset == 'coco':
            return int(self.arrays['ids'][i]), caps
        return self._string('path', i), caps

    # A DataLoader worker started by spawn/forkserver gets the cache file's name, not a copy of its contents.
    def __getstate__(self) -> dict:
        if self.origin is None:
            return self.__dict__
        return {'origin': self.origin, 'key': self.key, 'dataset': self.dataset}

    def __setstate__(self, state: dict) -> None:
        if 'arrays' in state:
            self.__dict__.update(state)
        else:
            self.__dict__.update(open_cache(state['origin'], state['key'], verify=False).__dict__)


# ----------------------------------------------------------------------------------------------------------------
# The cache file: magic, arrays (64-byte aligned), JSON header, trailer (header offset, length, end magic)
# ----------------------------------------------------------------------------------------------------------------
class CacheRejected(Exception):
    """A cache file that must not be used (missing, stale, truncated, corrupt); the message says why."""


def source_key(dataset: str, path: str) -> dict:
    real, st = os.path.realpath(path), os.stat(path)
    return {'path': real, 'size': st.st_size, 'mtime_ns': st.st_mtime_ns, 'format': dataset,
            'version': CACHE_VERSION}


def cache_path(cache_dir: str, dataset: str, path: str) -> str:
    real = os.path.realpath(path)
    stem = re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(real))[:60]
    digest = hashlib.sha256(real.encode(*_TEXT)).hexdigest()[:20]
    return os.path.join(os.path.expanduser(cache_dir), f'{stem}.{dataset}.{digest}{CACHE_SUFFIX}')


def write_cache(target: str, compact: CompactMetadata, key: dict) -> None:
    """Write ``compact`` to ``target`` atomically (checkpoints.atomic_write: temporary file, fsync, rename)."""
    with checkpoints.atomic_write(target) as f:
        f.write(_MAGIC.ljust(_ALIGN, b'\0'))
        crc, entries, pos = 0, {}, _ALIGN
        for name, array in compact.arrays.items():
            raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1).data
            entries[name] = {'dtype': array.dtype.str, 'shape': list(array.shape), 'offset': pos}
            f.write(raw)
            crc = zlib.crc32(raw, crc)
            pad = -(pos + len(raw)) % _ALIGN
            f.write(b'\0' * pad)
            crc = zlib.crc32(b'\0' * pad, crc)
            pos += len(raw) + pad
        header = json.dumps({'key': key, 'dataset': compact.dataset, 'per': compact.per, 'arrays': entries,
                             'crc32': crc}).encode()
        f.write(header)
        f.write(_TRAILER.pack(pos, len(header), _END_MAGIC))


def _verify_crc(f, end: int, expected: int) -> None:
    f.seek(_ALIGN)
    # read() into an anonymous mapping rather than through the file's mapping: neither the file's pages nor the
    # buffer stay in this process (a heap buffer this size could stay behind in malloc's free lists)
    crc, left, buf = 0, end - _ALIGN, mmap.mmap(-1, 1 << 24)
    with buf, memoryview(buf) as view:
        while left > 0:
            got = f.readinto(view[:min(left, len(buf))])
            if not got:
                raise CacheRejected('shorter than its header says')
            crc, left = zlib.crc32(view[:got], crc), left - got
    if crc != expected:
        raise CacheRejected('checksum mismatch (corrupt)')


def open_cache(target: str, key: Optional[dict], verify: bool = True) -> CompactMetadata:
    """Memory-map a cache file; raises CacheRejected unless it is complete, consistent and made from ``key``."""
    try:
        f = open(target, 'rb')
    except FileNotFoundError as e:
        raise CacheRejected('not built yet') from e
    except OSError as e:
        raise CacheRejected(f'cannot be opened ({e})') from e
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < _ALIGN + _TRAILER.size or f.read(len(_MAGIC)) != _MAGIC:
            raise CacheRejected('not a metadata cache file (bad magic or too short)')
        f.seek(size - _TRAILER.size)
        header_at, header_len, end = _TRAILER.unpack(f.read(_TRAILER.size))
        if end != _END_MAGIC or header_at + header_len + _TRAILER.size != size:
            raise CacheRejected('truncated or incomplete (trailer missing or inconsistent with the file size)')
        f.seek(header_at)
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CacheRejected(f'unreadable header ({e})') from e
        if not isinstance(header, dict) or not isinstance(header.get('arrays'), dict):
            raise CacheRejected('header without an array table')
        if key is not None and header.get('key') != key:
            raise CacheRejected(f'stale: made from {header.get("key")}, the source is now {key}')
        if verify:
            _verify_crc(f, header_at, header.get('crc32'))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        arrays = {}
        for name, e in header['arrays'].items():
            dtype, count = np.dtype(e['dtype']), int(np.prod(e['shape'], dtype=np.int64))
            if e['offset'] < _ALIGN or e['offset'] + count * dtype.itemsize > header_at:
                raise ValueError(f'array {name} lies outside the data region')
            arrays[name] = np.frombuffer(mapped, dtype, count, e['offset']).reshape(e['shape']) if count else \
                np.zeros(e['shape'], dtype)
        compact = CompactMetadata(header['dataset'], arrays, header['per'], origin=target, key=header['key'])
        _check_structure(compact)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise CacheRejected(f'inconsistent arrays ({type(e).__name__}: {e})') from e
    return compact


def _check_structure(c: CompactMetadata) -> None:
    """Cheap consistency of the offsets (first and last entries, lengths), touching a few pages only."""
    n, a = len(c), c.arrays
    columns = [k[:-4] for k in a if k.endswith('.off')]
    for col in columns:
        off, data = a[f'{col}.off'], a[f'{col}.data']
        if len(off) == 0 or off[0] != 0 or off[-1] != len(data):
            raise ValueError(f'{col} offsets do not span its bytes')
        if col != 'cap' and len(off) != n + 1:
            raise ValueError(f'{col} has {len(off) - 1} entries for {n} records')
    m = len(a['cap.off']) - 1
    if c._rec is not None and (c._rec[0] != 0 or c._rec[-1] != m):
        raise ValueError('caption ranges do not span the captions')
    if c._rec is None and m != n * c.per:
        raise ValueError(f'{m} captions for {n} records of {c.per}')
    if 'ids' in a and len(a['ids']) != n:
        raise ValueError(f'{len(a["ids"])} ids for {n} records')


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------
def load_metadata(dataset: str, path: str, cache_dir: Optional[str] = None) -> CompactMetadata:
    """``path`` as ``dataset``'s compact metadata; with ``cache_dir``, parsed once and memory-mapped from the cache.

    Without a cache folder (None, '' or 'none') the file is parsed and held in this process's memory (still flat).
    A cache folder that cannot be written falls back to that, with a warning.
    """
    if not cache_dir or cache_dir == 'none' or not os.path.isfile(path):
        return CompactMetadata.from_records(dataset, parse_metadata(dataset, path), path)
    key, target = source_key(dataset, path), cache_path(cache_dir, dataset, path)
    try:
        return open_cache(target, key)
    except CacheRejected as e:
        reason = str(e)
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        lock = open(target + '.lock', 'a')
    except OSError as e:
        logger.warning('metadata cache folder %r is not writable (%s): holding %s in memory', cache_dir, e, path)
        return CompactMetadata.from_records(dataset, parse_metadata(dataset, path), path)
    with lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # the other ranks wait here while one builds
        except OSError:
            pass  # no locks on this filesystem: several processes may build; the rename keeps it safe
        try:
            return open_cache(target, key)  # built by another process while this one waited
        except CacheRejected:
            pass
        logger.info('building the metadata cache %s from %s (%s)', target, path, reason)
        start = time.monotonic()
        records = parse_metadata(dataset, path)
        logger.info('read %s records of %s in %.1f s', f'{len(records):,}', path, time.monotonic() - start)
        with progress.Progress(f'metadata cache {dataset}', len(records), 'records') as counter:
            compact = CompactMetadata.from_records(dataset, records, path, counter)
        del records
        if source_key(dataset, path) != key:
            logger.warning('%s changed while it was read: not caching it', path)
            return compact
        try:
            write_cache(target, compact, key)
        except OSError as e:
            logger.warning('cannot write the metadata cache %s (%s): holding %s in memory', target, e, path)
            return compact
        del compact
        _release_freed_memory()
        return open_cache(target, key, verify=False)


def _release_freed_memory() -> None:
    """Hand the parse's freed heap back to the OS (glibc keeps it otherwise); a no-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
