"""Pre-training data: every metadata format from a tiny fixture, views per family, determinism, bad-image handling,
WebDataset sharding over ranks x workers, and the generated demo set."""
import argparse
import io
import json
import logging
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import datasets
import models
import samples
import utils


def _jpeg_bytes(color=(200, 30, 30), size=(40, 30)) -> bytes:
    """A JPEG of ``size`` whose green channel is a diagonal ramp, so that different crops differ."""
    w, h = size
    ramp = (np.add.outer(np.arange(h), np.arange(w)) * 255 // (w + h)).astype(np.uint8)
    pixels = np.stack([np.full_like(ramp, color[0]), ramp, np.full_like(ramp, color[2])], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format='JPEG')
    return buf.getvalue()


def _write(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def _args(**kw):
    base = dict(dataset='demo', root='', metadata='', model='CLIP_TINY', seed=0, demo_samples=64,
                train_num_samples=None, max_bad_fraction=0.1)
    base.update(kw)
    return argparse.Namespace(**base)


class RecordingTokenizer:
    """Remembers the captions it was given; returns a fixed-size LongTensor like the real one."""

    def __init__(self):
        self.seen = []

    def __call__(self, text):
        self.seen.append(text)
        return torch.zeros(77, dtype=torch.long)


def id_tokenizer(text):
    """'sample 7' -> tensor([7]): lets a test see which sample a batch row came from."""
    return torch.tensor([int(text.split()[-1])])


# ----------------------------------------------------------------------------------------------------------------
# Metadata formats
# ----------------------------------------------------------------------------------------------------------------
def _yfcc(tmp_path):
    """Three photos in two real zip archives: 12345678 -> images/12/345.zip:678.jpg."""
    for archive, members in {'12/345.zip': ['678.jpg', '679.jpg'], '00/000.zip': ['001.jpg']}.items():
        path = tmp_path / 'images' / archive
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(path, 'w') as zf:
            for k, m in enumerate(members):
                zf.writestr(m, _jpeg_bytes(size=(30 + k, 20)))
    records = [(12345678, 'a title', '   '), (12345679, '', 'only a description'), (1, 'red', 'blue')]
    meta = tmp_path / 'yfcc15m.pkl'
    meta.write_bytes(pickle.dumps(records))
    return str(meta), [(30, 20), (31, 20), (30, 20)], [['a title'], ['only a description'], ['red', 'blue']]


def _coco(tmp_path):
    for image_id in (7, 42):
        _write(str(tmp_path / 'train2017' / f'{image_id:012d}.jpg'), _jpeg_bytes(size=(20 + image_id, 20)))
    anns = [{'image_id': 42, 'caption': 'x one'}, {'image_id': 7, 'caption': 'y'}, {'image_id': 42, 'caption': 'x two'}]
    meta = tmp_path / 'captions_train2017.json'
    meta.write_text(json.dumps({'images': [], 'annotations': anns}))
    return str(meta), [(62, 20), (27, 20)], [['x one', 'x two'], ['y']]  # grouped in first-seen order


def _cc(key):
    def make(tmp_path):
        names = ['a/0.jpg', 'b/1.jpg']
        for k, name in enumerate(names):
            _write(str(tmp_path / name), _jpeg_bytes(size=(25 + k, 20)))
        if key == 'image_id':
            recs = [{'image_id': n, 'captions': [f'cap {k}']} for k, n in enumerate(names)]
        else:
            recs = [{'image_name': n, 'image_id': k, 'captions': [f'cap {k}', 'alt']} for k, n in enumerate(names)]
        meta = str(tmp_path / 'meta.npy')
        np.save(meta, np.array(recs, dtype=object), allow_pickle=True)
        return meta, [(25, 20), (26, 20)], [r['captions'] for r in recs]
    return make


def _redcaps(tmp_path):
    anns = [{'image_id': 'abc', 'subreddit': 'pics', 'caption': 'a dog'},
            {'image_id': 'xyz', 'subreddit': 'earthporn', 'caption': 'a lake'}]
    for k, a in enumerate(anns):
        _write(str(tmp_path / a['subreddit'] / f"{a['image_id']}.jpg"), _jpeg_bytes(size=(33 + k, 20)))
    meta = tmp_path / 'redcaps.json'
    meta.write_text(json.dumps(anns))
    return str(meta), [(33, 20), (34, 20)], [['a dog'], ['a lake']]


FORMATS = {'yfcc15m': _yfcc, 'coco': _coco, 'cc3m': _cc('image_id'), 'cc12m': _cc('image_name'), 'redcaps': _redcaps}


@pytest.mark.parametrize('name', list(FORMATS))
def test_metadata_formats_read_images_and_captions(tmp_path, name):
    meta, sizes, captions = FORMATS[name](tmp_path)
    source = datasets.MetadataSource(name, str(tmp_path), meta)
    assert len(source) == len(sizes)
    for i, (size, caps) in enumerate(zip(sizes, captions, strict=True)):
        image, got = source(i)
        assert image.mode == 'RGB' and image.size == size
        assert [c for c in got if c.strip()] == caps


def test_yfcc_caption_never_picks_a_blank_one(tmp_path):
    meta, _, _ = _yfcc(tmp_path)
    tok = RecordingTokenizer()
    ds = datasets.get_train_dataset(_args(dataset='yfcc15m', root=str(tmp_path), metadata=meta), tok)
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ds[i]
    assert tok.seen.count('a title') == 12 and tok.seen.count('only a description') == 12
    assert {'red', 'blue'} <= set(tok.seen) and all(c.strip() for c in tok.seen)
    # ... while an all-blank record still yields a (blank) caption instead of failing
    assert datasets.pick_caption(['', ' '], np.random.default_rng(0)).strip() == ''


def test_yfcc_zip_cache_per_process_and_bounded(tmp_path, monkeypatch):
    meta, _, _ = _yfcc(tmp_path)
    source = datasets.MetadataSource('yfcc15m', str(tmp_path), meta)
    monkeypatch.setattr(samples, '_zip_caches', {})
    monkeypatch.setattr(samples, 'ZIP_CACHE_SIZE', 1)
    first = np.asarray(source(0)[0])
    cache = samples._zip_caches[os.getpid()]
    assert list(cache) == [str(tmp_path / 'images' / '12' / '345.zip')]
    source(2)  # another archive: the least recently used one is closed and dropped
    assert list(cache) == [str(tmp_path / 'images' / '00' / '000.zip')]
    monkeypatch.setattr(samples, '_zip_caches', {12345: {}})  # as inherited from a parent process
    source(0)
    assert list(samples._zip_caches) == [os.getpid()]  # the parent's handles are never reused
    monkeypatch.setattr(samples, 'ZIP_KEEP_OPEN', False)
    monkeypatch.setattr(samples, '_zip_caches', {})
    assert np.array_equal(np.asarray(source(0)[0]), first) and samples._zip_caches == {}


@pytest.mark.parametrize('writer,expected', [
    (None, FileNotFoundError),
    (lambda p: p.write_bytes(pickle.dumps([(1, 'title', 'desc'), (2, 'title')])), ValueError),  # 2-tuple
    (lambda p: p.write_bytes(pickle.dumps([('1', 'title', 'desc')])), ValueError),  # id not int
    (lambda p: p.write_bytes(pickle.dumps([])), ValueError),  # empty
    (lambda p: p.write_bytes(b'not a pickle at all'), ValueError),
])
def test_malformed_yfcc_metadata_fails_naming_the_file(tmp_path, writer, expected):
    path = tmp_path / 'bad.pkl'
    if writer:
        writer(path)
    with pytest.raises(expected, match='bad.pkl'):
        datasets.get_train_dataset(_args(dataset='yfcc15m', root=str(tmp_path), metadata=str(path)), None)


@pytest.mark.parametrize('name,content', [
    ('coco', {'images': []}),  # no annotations
    ('coco', {'annotations': [{'image_id': '7', 'caption': 'x'}]}),  # wrong type
    ('redcaps', {'annotations': []}),  # the per-subreddit layout instead of the combined list
    ('redcaps', [{'image_id': 'a', 'caption': 'x'}]),  # no subreddit
])
def test_malformed_json_metadata_fails_naming_the_file(tmp_path, name, content):
    path = tmp_path / 'meta.json'
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match='meta.json'):
        datasets.MetadataSource(name, str(tmp_path), str(path))


@pytest.mark.parametrize('records', [[{'image_id': 'a.jpg'}], [{'image_id': 'a.jpg', 'captions': []}],
                                     [{'image_name': 'a.jpg', 'captions': ['x']}]])
def test_malformed_cc3m_metadata_fails_naming_the_file(tmp_path, records):
    path = str(tmp_path / 'cc3m.npy')
    np.save(path, np.array(records, dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"cc3m\.npy.*'image_id' and 'captions'"):
        datasets.MetadataSource('cc3m', str(tmp_path), path)


# ----------------------------------------------------------------------------------------------------------------
# Views, determinism, bad images
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('model,n_images', [('CLIP_TINY', 1), ('SIMCLR_TINY', 2), ('SLIP_TINY', 3)])
def test_views_per_family_and_collated_bad_count(tmp_path, tokenizer, model, n_images):
    meta, _, _ = _coco(tmp_path)
    ds = datasets.get_train_dataset(_args(dataset='coco', root=str(tmp_path), metadata=meta, model=model), tokenizer)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=augment.Batch.collate)))
    images = [getattr(batch, k) for k in augment.Batch.VIEWS if getattr(batch, k) is not None]
    assert len(images) == n_images and all(v.shape == (2, 3, 64, 64) and v.dtype == torch.float32 for v in images)
    assert (batch.image is None) == (model == 'SIMCLR_TINY') and (batch.aug1 is None) == (model == 'CLIP_TINY')
    if model != 'SIMCLR_TINY':
        assert batch.text.shape == (2, 77) and (batch.text.argmax(-1) > 0).all()
    else:
        assert batch.text is None
    assert batch.n_bad.dtype == torch.int64 and batch.n_bad.shape == (2,) and batch.n_bad.sum() == 0


def test_same_seed_epoch_index_is_bitwise_identical_in_any_worker(tmp_path, tokenizer):
    meta, _, _ = _coco(tmp_path)
    args = _args(dataset='coco', root=str(tmp_path), metadata=meta, model='SLIP_TINY', seed=3)
    ds = datasets.get_train_dataset(args, tokenizer)
    ds.set_epoch(5)
    torch.manual_seed(0)
    expected_draw = torch.rand(3)
    torch.manual_seed(0)
    first = ds[1]
    assert torch.equal(torch.rand(3), expected_draw)  # a sample leaves the caller's random streams alone
    fresh = datasets.get_train_dataset(args, tokenizer)
    fresh.set_epoch(5)
    loader = torch.utils.data.DataLoader(fresh, batch_size=1, num_workers=2, collate_fn=augment.Batch.collate)
    expected = first.tensors()
    for got in (fresh[1], list(loader)[1]):
        got = got.tensors()
        assert set(got) == set(expected)
        assert all(torch.equal(expected[k], got[k].reshape(expected[k].shape)) for k in expected)
    fresh.set_epoch(6)  # another epoch: other crops and augmentations of the same image
    moved = list(loader)[1]
    assert not torch.equal(moved.image[0], first.image) and not torch.equal(moved.aug1[0], first.aug1)
    other_seed = datasets.get_train_dataset(_args(**{**vars(args), 'seed': 4}), tokenizer)
    other_seed.set_epoch(5)
    assert not torch.equal(other_seed[1].image, first.image)


@pytest.mark.parametrize('model', ['CLIP_TINY', 'SIMCLR_TINY', 'SLIP_TINY'])
def test_uint8_views_finished_on_device_equal_float_views_bitwise(tmp_path, tokenizer, model):
    meta, _, _ = _coco(tmp_path)
    family = models.get_spec(model).family
    batches = {}
    for fmt in ('float', 'uint8'):
        ds = datasets.get_train_dataset(_args(dataset='coco', root=str(tmp_path), metadata=meta, model=model,
                                              image_format=fmt), tokenizer)
        ds.set_epoch(2)
        batches[fmt] = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=augment.Batch.collate)))
    views = [k for k in augment.Batch.VIEWS if getattr(batches['uint8'], k) is not None]
    assert len(views) == {'clip': 1, 'simclr': 2, 'slip': 3}[family]
    assert all(getattr(batches['uint8'], k).dtype == torch.uint8 for k in views)
    finished, reference = augment.finish_views(batches['uint8']).tensors(), batches['float'].tensors()
    assert set(finished) == set(reference)
    assert all(torch.equal(finished[k], reference[k]) for k in reference)


def test_missing_and_truncated_images_are_replaced_and_counted(tmp_path, monkeypatch):
    good = _jpeg_bytes(size=(64, 48))
    _write(str(tmp_path / 'good0.jpg'), good)
    _write(str(tmp_path / 'good1.jpg'), good)
    _write(str(tmp_path / 'truncated.jpg'), good[:len(good) // 2])
    _write(str(tmp_path / 'garbage.jpg'), b'\x00' * 100)
    names = ['good0.jpg', 'truncated.jpg', 'missing.jpg', 'garbage.jpg', 'good1.jpg']
    meta = str(tmp_path / 'cc3m.npy')
    np.save(meta, np.array([{'image_id': n, 'captions': ['c']} for n in names], dtype=object), allow_pickle=True)
    warned = []
    monkeypatch.setattr(datasets, 'warn_bad', warned.append)
    ds = datasets.get_train_dataset(_args(dataset='cc3m', root=str(tmp_path), metadata=meta), RecordingTokenizer())
    n_bad = [int(ds[i].n_bad) for i in range(len(ds))]
    assert n_bad[0] == 0 and n_bad[4] == 0 and all(n >= 1 for n in n_bad[1:4])
    assert len(warned) == sum(n_bad)
    assert any('truncated.jpg' in w for w in warned) and any('missing.jpg' in w for w in warned)
    assert n_bad == [int(ds[i].n_bad) for i in range(len(ds))]  # the replacement is deterministic too


def test_all_bad_images_stop_with_a_clear_error(tmp_path, monkeypatch):
    meta = str(tmp_path / 'cc3m.npy')
    np.save(meta, np.array([{'image_id': 'nothing.jpg', 'captions': ['c']}], dtype=object), allow_pickle=True)
    monkeypatch.setattr(datasets, 'warn_bad', lambda message: None)
    ds = datasets.get_train_dataset(_args(dataset='cc3m', root=str(tmp_path), metadata=meta), RecordingTokenizer())
    with pytest.raises(RuntimeError, match='image root'):
        ds[0]


def test_bad_image_warnings_are_rate_limited(monkeypatch):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    monkeypatch.setattr(samples, '_bad_seen', [0])
    utils.logger.addHandler(handler)
    try:
        for k in range(100):
            datasets.warn_bad(f'image {k}')
    finally:
        utils.logger.removeHandler(handler)
    assert len(records) == 10 + 3  # the first ten, then the 16th, 32nd and 64th


def test_transforms_sizes():
    clip, ssl, val = datasets.build_transforms(48)
    image = Image.new('RGB', (100, 70), (10, 200, 30))
    for t in (clip, ssl, val):
        out = t(image)
        assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    assert torch.allclose(val(image)[:, 0, 0], (torch.tensor([10, 200, 30]) / 255 - torch.tensor(
        datasets.IMAGENET_MEAN)) / torch.tensor(datasets.IMAGENET_STD), atol=1e-2)


# ----------------------------------------------------------------------------------------------------------------
# WebDataset shards
# ----------------------------------------------------------------------------------------------------------------
def _shards(tmp_path, sizes=(3, 2, 4, 1, 2, 3), corrupt=(2, 0)):
    """Shards in img2dataset layout with captions 'sample <k>'; sample ``corrupt`` holds undecodable bytes."""
    expected, k = [], 0
    for s, n in enumerate(sizes):
        with tarfile.open(tmp_path / f'{s:05d}.tar', 'w') as tar:
            for pos in range(n):
                key = f'{s:05d}{pos:04d}'
                image = b'not an image' if (s, pos) == corrupt else _jpeg_bytes(color=(k, 0, 0))
                ext = 'png' if pos == 1 else 'jpg'
                if ext == 'png' and image != b'not an image':
                    buf = io.BytesIO()
                    Image.open(io.BytesIO(image)).save(buf, format='PNG')
                    image = buf.getvalue()
                for name, data in ((f'{key}.{ext}', image), (f'{key}.txt', f'sample {k}'.encode()),
                                   (f'{key}.json', json.dumps({'key': key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                if (s, pos) != corrupt:
                    expected.append(k)
                k += 1
    return str(tmp_path / f'{{00000..{len(sizes) - 1:05d}}}.tar'), expected


def _wds(monkeypatch, urls, rank, world_size, **kw):
    monkeypatch.setattr(utils, 'get_rank', lambda: rank)
    monkeypatch.setattr(utils, 'get_world_size', lambda: world_size)
    args = _args(dataset='wds', root=urls, train_num_samples=kw.pop('num_samples', 15), **kw)
    return datasets.get_train_dataset(args, id_tokenizer)


def test_webdataset_two_ranks_two_workers_cover_every_sample_once(tmp_path, monkeypatch):
    urls, expected = _shards(tmp_path, sizes=(2,) * 8, corrupt=(2, 0))  # 16 samples, one undecodable
    seen, bad = [], 0
    for rank in (0, 1):
        ds = _wds(monkeypatch, urls, rank, 2, num_samples=16, batch_size=2)
        assert ds.num_samples == 16 and (ds.rank, ds.world_size) == (rank, 2) and ds.per_rank_batches == 4
        ds.set_epoch(3)
        for batch in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=augment.Batch.collate):
            assert batch.image.shape[1:] == (3, 64, 64)
            seen += batch.text.flatten().tolist()
            bad += int(batch.n_bad.sum())
    # every good sample at least once, 16 in all: the corrupt one is counted and replaced by a buffered sample
    assert sorted(set(seen)) == expected and len(seen) == 16 and bad == 1


def test_webdataset_shard_order_is_per_epoch_and_deterministic(tmp_path, monkeypatch):
    urls, _ = _shards(tmp_path)
    ds = _wds(monkeypatch, urls, 0, 1)
    orders = []
    for epoch in (0, 1, 0):
        ds.set_epoch(epoch)
        orders.append(ds.shards_for_worker())
        assert sorted(orders[-1]) == list(range(6))
    assert orders[0] == orders[2] and orders[0] != orders[1]
    ds.set_epoch(0)
    first, again = list(ds), list(ds)
    assert all(torch.equal(a, b) for x, y in zip(first, again, strict=True)
               for a, b in zip(x.tensors().values(), y.tensors().values(), strict=True))


def test_webdataset_needs_num_samples_and_existing_shards(tmp_path, monkeypatch):
    urls, _ = _shards(tmp_path, sizes=(1,), corrupt=None)
    with pytest.raises(ValueError, match='--train-num-samples'):
        _wds(monkeypatch, urls, 0, 1, num_samples=None)
    with pytest.raises(FileNotFoundError, match='9 of 10 shards.*00001.tar'):
        _wds(monkeypatch, str(tmp_path / '{00000..00009}.tar'), 0, 1)


# ----------------------------------------------------------------------------------------------------------------
# Demo data
# ----------------------------------------------------------------------------------------------------------------
def test_demo_pretraining_pairs_are_deterministic_and_described(tokenizer):
    assert len(datasets.DEMO_CLASSNAMES) == 32 and datasets.DEMO_CLASSNAMES[1] == 'red square'
    a, label, captions = datasets.demo_sample(37)
    b, _, _ = datasets.demo_sample(37)
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()
    color, shape = datasets.DEMO_CLASSNAMES[label].split()
    assert len(set(captions)) > 1 and all(color in c and shape in c for c in captions)
    corner, colors = a.getpixel((0, 0)), {c for _, c in a.getcolors(64 * 64)}
    assert len(colors) >= 2 and corner != datasets.DEMO_RGB[datasets.DEMO_COLORS.index(color)]
    ds = datasets.get_train_dataset(_args(model='SLIP_TINY', demo_samples=10), tokenizer)
    assert len(ds) == 10 and set(ds[3].tensors()) == {'image', 'text', 'aug1', 'aug2', 'n_bad'}
    assert int(ds[3].n_bad) == 0


def test_demo_zero_shot_split_is_balanced_and_held_out():
    test = datasets.DemoZeroShotDataset('test')
    assert len(test) == 1024
    assert np.bincount([test[i][1] for i in range(len(test))], minlength=32).tolist() == [32] * 32
    train = datasets.DemoZeroShotDataset('train', transform=datasets.build_transforms(64)[2], size=8)
    image, label = train[5]
    assert image.shape == (3, 64, 64) and label == 5
    pretrain = {datasets.demo_sample(i)[0].tobytes() for i in range(64)}
    assert not pretrain & {test[i][0].tobytes() for i in range(64)}
    catalog = {'demo': {'path': '', 'type': 'demo'}}
    assert isinstance(datasets.get_downstream_dataset(catalog, 'demo', False, None), datasets.DemoZeroShotDataset)
    with pytest.raises(ValueError, match='split'):
        datasets.DemoZeroShotDataset('val')


def test_unknown_dataset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match='imagenet'):
        datasets.get_train_dataset(_args(dataset='imagenet', metadata=str(tmp_path / 'x')), None)
