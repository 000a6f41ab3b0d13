"""metadata.py: compact records equal the Python ones for every format, the per-node cache (reuse, rebuild on change,
truncated or corrupt files refused, atomic writes), pickles refused when they would run code, and training data
bitwise the same as from the Python records."""
import io
import json
import multiprocessing
import os
import pickle
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import datasets
import metadata


def _yfcc(tmp_path):
    records = [(12345678, 'a title', '   '), (np.int64(12345679), '', 'only a description'), (1, 'red', 'blue'),
               (7, 'café ünïcode ✓', 'line\nbreak\ttab'), (8, '', '')]
    path = tmp_path / 'yfcc15m.pkl'
    path.write_bytes(pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL))
    return str(path)


def _cc(key):
    def make(tmp_path):
        recs = [{key: 'a/0.jpg', 'captions': ['cap 0']}, {key: 'b/ü.jpg', 'captions': ['x', '', 'z ✓']},
                {key: 'c.jpg', 'image_id': 3, 'captions': ('only',)}]
        path = tmp_path / f'{key}.npy'
        np.save(path, np.array(recs, dtype=object), allow_pickle=True)
        return str(path)
    return make


def _coco(tmp_path):
    anns = [{'image_id': 42, 'caption': 'x one'}, {'image_id': 7, 'caption': 'y'}, {'image_id': 42, 'caption': 'x two'},
            {'image_id': 3, 'caption': ''}, {'image_id': 7, 'caption': 'lone \ud800 surrogate'}]
    path = tmp_path / 'captions_train2017.json'
    path.write_text(json.dumps({'images': [], 'annotations': anns}))
    return str(path)


def _redcaps(tmp_path):
    anns = [{'image_id': 'abc', 'subreddit': 'pics', 'caption': 'a dog'},
            {'image_id': 'xyz', 'subreddit': 'earthporn', 'caption': 'a läke'},
            {'image_id': '', 'subreddit': 'e', 'caption': ''}]
    path = tmp_path / 'redcaps.json'
    path.write_text(json.dumps(anns))
    return str(path)


FORMATS = {'yfcc15m': _yfcc, 'cc3m': _cc('image_id'), 'cc12m': _cc('image_name'), 'coco': _coco,
           'redcaps': _redcaps}


def _normalised(records):
    """parse_metadata's records with numpy ids as int and caption tuples as lists (the compact form's types)."""
    out = []
    for r in records:
        r = tuple(r)
        r = (int(r[0]),) + r[1:] if isinstance(r[0], (int, np.integer)) else r
        out.append(tuple(list(x) if isinstance(x, (list, tuple)) else x for x in r))
    return out


@pytest.mark.parametrize('name', list(FORMATS))
def test_compact_and_cached_records_equal_the_python_records(tmp_path, name):
    path = FORMATS[name](tmp_path)
    expected = _normalised(metadata.parse_metadata(name, path))
    in_memory = metadata.load_metadata(name, path)
    cached = metadata.load_metadata(name, path, str(tmp_path / 'cache'))
    assert cached.origin is not None and in_memory.origin is None
    for compact in (in_memory, cached, metadata.load_metadata(name, path, str(tmp_path / 'cache'))):
        assert len(compact) == len(expected)
        got = [compact[i] for i in range(len(compact))]
        assert got == expected
        assert all(type(a) is type(b) for g, e in zip(got, expected) for a, b in zip(g, e))
    if name == 'coco':  # grouped by image in first-appearance order
        assert [r[0] for r in got] == [42, 7, 3] and got[0][1] == ['x one', 'x two']


def test_metadata_source_returns_the_same_captions_as_the_python_records(tmp_path):
    path = _yfcc(tmp_path)
    python = metadata.parse_metadata('yfcc15m', path)
    source = datasets.MetadataSource('yfcc15m', str(tmp_path), path, str(tmp_path / 'cache'))
    rng = lambda i: np.random.default_rng([0, 3, i])  # noqa: E731
    for i, r in enumerate(python):
        caps = (source.records[i][1], source.records[i][2])
        assert caps == (r[1], r[2])
        assert datasets.pick_caption(caps, rng(i)) == datasets.pick_caption((r[1], r[2]), rng(i))


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------
def _cache_files(folder):
    return sorted(p for p in os.listdir(folder) if not p.endswith('.lock'))


def _count_parses(monkeypatch):
    calls = []
    real = metadata.parse_metadata

    def counting(dataset, path):
        calls.append(path)
        return real(dataset, path)
    monkeypatch.setattr(metadata, 'parse_metadata', counting)
    return calls


def test_cache_is_reused_without_parsing_again(tmp_path, monkeypatch):
    path, cache = _yfcc(tmp_path), str(tmp_path / 'cache')
    calls = _count_parses(monkeypatch)
    first = metadata.load_metadata('yfcc15m', path, cache)
    second = metadata.load_metadata('yfcc15m', path, cache)
    assert len(calls) == 1 and second.origin == first.origin
    assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]
    assert len(_cache_files(cache)) == 1 and _cache_files(cache)[0].endswith('.slipmeta')


def test_cache_is_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    path, cache = _yfcc(tmp_path), str(tmp_path / 'cache')
    calls = _count_parses(monkeypatch)
    metadata.load_metadata('yfcc15m', path, cache)
    with open(path, 'wb') as f:
        pickle.dump([(5, 'new title', 'new description')], f)
    changed = metadata.load_metadata('yfcc15m', path, cache)
    assert len(calls) == 2 and len(changed) == 1 and changed[0] == (5, 'new title', 'new description')
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))  # same bytes, newer modification time
    metadata.load_metadata('yfcc15m', path, cache)
    assert len(calls) == 3 and len(_cache_files(cache)) == 1  # replaced in place, not one file per version


@pytest.mark.parametrize('damage', ['truncate', 'flip_a_byte', 'garbage', 'header'])
def test_damaged_cache_file_is_rejected_and_rebuilt(tmp_path, monkeypatch, damage):
    path, cache = _yfcc(tmp_path), str(tmp_path / 'cache')
    good = metadata.load_metadata('yfcc15m', path, cache)
    target, expected = good.origin, [good[i] for i in range(len(good))]
    del good
    data = bytearray(open(target, 'rb').read())
    if damage == 'truncate':
        data = data[:len(data) - 10]
    elif damage == 'flip_a_byte':
        data[metadata._ALIGN + 3] ^= 0xFF  # inside the first array
    elif damage == 'garbage':
        data = b'\0' * len(data)
    else:  # a well-formed file whose JSON header is not a header
        at, length, _ = metadata._TRAILER.unpack(bytes(data[-metadata._TRAILER.size:]))
        data[at:at + length] = b'[]'.ljust(length)
    with open(target, 'wb') as f:
        f.write(data)
    with pytest.raises(metadata.CacheRejected):
        metadata.open_cache(target, metadata.source_key('yfcc15m', path))
    calls = _count_parses(monkeypatch)
    rebuilt = metadata.load_metadata('yfcc15m', path, cache)
    assert len(calls) == 1 and [rebuilt[i] for i in range(len(rebuilt))] == expected
    metadata.open_cache(target, metadata.source_key('yfcc15m', path))  # the rebuilt file is accepted


def _build_in_child(path, cache, log, out):
    real = metadata.parse_metadata

    def slow_logged_parse(dataset, p):
        with open(log, 'a') as f:
            f.write('parse\n')
        time.sleep(0.5)  # a wide window for the other process to race in
        return real(dataset, p)
    metadata.parse_metadata = slow_logged_parse
    compact = metadata.load_metadata('yfcc15m', path, cache)
    with open(out, 'w') as f:
        json.dump([compact.origin, [list(compact[i]) for i in range(len(compact))]], f)


def test_racing_processes_parse_once_and_share_one_cache_file(tmp_path):
    path, cache, log = _yfcc(tmp_path), str(tmp_path / 'cache'), str(tmp_path / 'parses.log')
    ctx = multiprocessing.get_context('fork')
    procs = [ctx.Process(target=_build_in_child, args=(path, cache, log, str(tmp_path / f'out{k}.json')))
             for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = [json.loads((tmp_path / f'out{k}.json').read_text()) for k in range(3)]
    assert open(log).read() == 'parse\n'  # one process parsed; the others waited and mapped its file
    assert results[0][0] is not None and all(r == results[0] for r in results)
    assert len(_cache_files(cache)) == 1


def test_an_id_too_large_for_64_bits_fails_naming_the_file(tmp_path):
    path = tmp_path / 'huge.pkl'
    path.write_bytes(pickle.dumps([(2 ** 70, 'title', 'desc')]))
    with pytest.raises(ValueError, match=r'huge\.pkl: a photo_id does not fit in 64 bits'):
        metadata.load_metadata('yfcc15m', str(path))

def test_failed_cache_write_leaves_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path, cache = _yfcc(tmp_path), str(tmp_path / 'cache')
    target = metadata.load_metadata('yfcc15m', path, cache).origin
    before = open(target, 'rb').read()
    compact = metadata.load_metadata('yfcc15m', path)

    def fail(*a, **k):
        raise OSError('disk full')
    monkeypatch.setattr(metadata.os, 'fsync', fail)
    with pytest.raises(OSError, match='disk full'):
        metadata.write_cache(target, compact, metadata.source_key('yfcc15m', path))
    assert open(target, 'rb').read() == before and _cache_files(cache) == [os.path.basename(target)]


def test_unwritable_cache_folder_falls_back_to_memory(tmp_path):
    path = _yfcc(tmp_path)
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    compact = metadata.load_metadata('yfcc15m', path, str(blocker / 'cache'))
    assert compact.origin is None and compact[2] == (1, 'red', 'blue')


def test_cached_records_pickle_as_the_file_name_not_the_arrays(tmp_path):
    path = _coco(tmp_path)
    cached = metadata.load_metadata('coco', path, str(tmp_path / 'cache'))
    blob = pickle.dumps(cached)
    assert len(blob) < 1000 and b'x one' not in blob  # a spawned worker maps the file itself
    again = pickle.loads(blob)
    assert again.origin == cached.origin and [again[i] for i in range(3)] == [cached[i] for i in range(3)]
    in_memory = pickle.loads(pickle.dumps(metadata.load_metadata('coco', path)))
    assert in_memory[0] == cached[0]


def test_malformed_metadata_fails_naming_the_file_with_a_cache_too(tmp_path):
    bad = tmp_path / 'bad.pkl'
    bad.write_bytes(pickle.dumps([(1, 'title', 'desc'), (2, 'title')]))
    with pytest.raises(ValueError, match=r'bad\.pkl: record 1 .*expected a non-empty list'):
        metadata.load_metadata('yfcc15m', str(bad), str(tmp_path / 'cache'))
    assert _cache_files(tmp_path / 'cache') == []
    with pytest.raises(FileNotFoundError, match='missing.pkl'):
        metadata.load_metadata('yfcc15m', str(tmp_path / 'missing.pkl'), str(tmp_path / 'cache'))


# ----------------------------------------------------------------------------------------------------------------
# Restricted unpickling
# ----------------------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this calls os.mkdir(marker): code a metadata file must never get to run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize('name', ['yfcc15m', 'cc3m'])
def test_metadata_carrying_a_payload_is_refused_and_not_run(tmp_path, name):
    marker = str(tmp_path / 'payload_ran')
    if name == 'yfcc15m':
        path = tmp_path / 'yfcc15m.pkl'
        path.write_bytes(pickle.dumps([(1, 'title', 'desc'), (2, Payload(marker), 'x')]))
    else:
        path = tmp_path / 'cc3m.npy'
        np.save(path, np.array([{'image_id': 'a.jpg', 'captions': ['c'], 'x': Payload(marker)}], dtype=object),
                allow_pickle=True)
    with pytest.raises(metadata.UnsafeMetadata, match=rf'{path.name}: refused to load: .*(posix|os)\.mkdir'):
        datasets.MetadataSource(name, str(tmp_path), str(path), str(tmp_path / 'cache'))
    assert not os.path.exists(marker)


def test_only_latin1_bytes_are_admitted_through_codecs(tmp_path):
    path = tmp_path / 'yfcc15m.pkl'
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")  # protocol 0: _codecs.encode('abc', 'rot13')
    with pytest.raises(ValueError, match=r"yfcc15m\.pkl: cannot read it as .*codec 'rot13'"):
        metadata.parse_metadata('yfcc15m', str(path))

def _npy_with_payload(path, array, payload):
    with open(path, 'wb') as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(payload)


def test_real_formats_load_in_every_pickle_protocol_and_numpy_naming(tmp_path):
    records = [(np.int64(12345678), 'a title', 'a description'), (3, 'x', 'y')]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f'yfcc_p{protocol}.pkl'
        path.write_bytes(pickle.dumps(records, protocol=protocol))
        assert metadata.parse_metadata('yfcc15m', str(path)) == records
    array = np.array([{'image_id': 'a.jpg', 'captions': ['c', 'd']}], dtype=object)
    for naming in ('numpy._core', 'numpy.core'):  # numpy 2 and numpy 1 pickles name the module differently
        payload = pickle.dumps(array, protocol=2).replace(b'numpy._core', naming.encode())
        path = tmp_path / f'cc3m_{naming}.npy'
        _npy_with_payload(path, array, payload)
        assert metadata.parse_metadata('cc3m', str(path)) == [('a.jpg', ['c', 'd'])]
    assert metadata.safe_npy_load(str(tmp_path / 'cc3m_numpy.core.npy'))[0] == array[0]
    plain = tmp_path / 'ids.npy'
    np.save(plain, np.arange(4))
    assert metadata.safe_npy_load(str(plain)).tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------------------------
# Training data: bitwise what the Python records give
# ----------------------------------------------------------------------------------------------------------------
def _jpeg(k):
    pixels = np.full((20 + k, 24 + 2 * k, 3), (40 * k) % 255, np.uint8)
    pixels[..., 1] = np.add.outer(np.arange(20 + k), np.arange(24 + 2 * k)).astype(np.uint8) * 3
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format='JPEG')
    return buf.getvalue()


def _yfcc_with_images(tmp_path, n=8):
    records = []
    archive = tmp_path / 'images' / '12' / '345.zip'
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, 'w') as zf:
        for k in range(n):
            zf.writestr(f'{600 + k}.jpg', _jpeg(k))
            records.append((12345600 + k, f'title {k}' if k % 3 else ' ', f'description {k} ✓'))
    path = tmp_path / 'yfcc15m.pkl'
    path.write_bytes(pickle.dumps(records))
    return str(path)


def test_training_batches_are_bitwise_those_of_the_python_records(tmp_path, monkeypatch):
    import utils
    path = _yfcc_with_images(tmp_path)
    args = dict(dataset='yfcc15m', root=str(tmp_path), metadata=path, model='SLIP_TINY', seed=5, image_format='uint8')

    def batches(cache, python_lists):
        if python_lists:  # how MetadataSource held the records before: parse_metadata's list
            monkeypatch.setattr(metadata, 'load_metadata', lambda d, p, c=None: metadata.parse_metadata(d, p))
        ds = datasets.get_train_dataset(__import__('argparse').Namespace(metadata_cache=cache, **args),
                                        utils.Tokenizer())
        monkeypatch.undo()
        out = []
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=augment.Batch.collate,
                                                 sampler=np.random.default_rng(epoch).permutation(len(ds)).tolist())
            out += [t for batch in loader for t in batch.tensors().values()]
        return out

    expected = batches(None, True)
    for got in (batches(str(tmp_path / 'cache'), False), batches(str(tmp_path / 'cache'), False),
                batches(None, False)):
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.slow  # two short training runs
def test_short_training_run_ends_with_bitwise_the_weights_of_the_python_records(tmp_path, monkeypatch):
    import argparse
    import main as main_script
    import utils
    path = _yfcc_with_images(tmp_path)

    def train(out, cache, python_lists):
        if python_lists:  # how MetadataSource held the records before: parse_metadata's list
            monkeypatch.setattr(metadata, 'load_metadata', lambda d, p, c=None: metadata.parse_metadata(d, p))
        argv = ['--dataset', 'yfcc15m', '--root', tmp_path, '--metadata', path, '--metadata-cache', cache,
                '--model', 'SLIP_TINY', '--batch-size', 4, '--epochs', 2, '--workers', 2, '--precision', 'fp32',
                '--eval-dataset', 'none', '--output-dir', tmp_path / out, '--warmup-epochs', 1, '--lr', 1e-3]
        args = argparse.ArgumentParser(parents=[main_script.get_args_parser()]).parse_args([str(a) for a in argv])
        os.makedirs(args.output_dir)
        main_script.main(args)
        monkeypatch.undo()
        return utils.load_checkpoint(str(tmp_path / out / 'checkpoint.pt'))['state_dict']

    before = train('python', 'none', True)
    after = train('compact', str(tmp_path / 'cache'), False)
    assert os.listdir(tmp_path / 'cache') and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
