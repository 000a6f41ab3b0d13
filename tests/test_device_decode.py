"""--decode-device: workers send JPEG bytes and drawn crops, the main process decodes the batch and makes the views.
Against the per-sample --device-augment path: the same draws bitwise, views within rounding, bad images replaced and
counted the same; every format; the Batch's bytes through collate/chunk/to; main.py end to end and resumed bitwise."""
import argparse
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import augment
import bench
import datasets
import device_decode
import main as main_script
import train_data
import views
from conftest import assert_same_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The stated tolerance of the batched views against the per-sample path's (both uint8, before the colour ops): the
# same antialiased bilinear filter as PIL's, with other rounding (PIL rounds to uint8 between its two passes; float
# interpolate not at all, uint8 interpolate at other points). Measured on bench's 500x375 fixture (192 samples x 3
# views at 224 px): uint8 resize max 2, mean 0.015 levels; float resize max 1, mean 0.17 levels.
MAX_LEVELS, MEAN_LEVELS = 2, 0.5


def smooth_jpeg(k, size=(96, 72), mode='RGB', fmt='JPEG'):
    """Photo-like content (bicubic upsampling of random colours, as bench's fixture), differing with k."""
    base = np.random.default_rng(k).integers(0, 255, (9, 12, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.BICUBIC).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
    return buf.getvalue()


def write_cc3m(root, images):
    """cc3m layout in ``root``: image k is ``<k>.jpg`` holding ``images[k]``, captioned 'cap <k>'."""
    os.makedirs(root, exist_ok=True)
    for k, data in enumerate(images):
        with open(os.path.join(root, f'{k}.jpg'), 'wb') as f:
            f.write(data)
    meta = os.path.join(root, 'cc3m.npy')
    records = [{'image_id': f'{k}.jpg', 'captions': [f'cap {k}']} for k in range(len(images))]
    np.save(meta, np.array(records, dtype=object), allow_pickle=True)
    return meta


def write_shard(folder, images, exts):
    os.makedirs(folder, exist_ok=True)
    with tarfile.open(os.path.join(folder, '00000.tar'), 'w') as tar:
        for k, (data, ext) in enumerate(zip(images, exts)):
            for name, payload in ((f'{k:06d}.{ext}', data), (f'{k:06d}.txt', f'cap {k}'.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return os.path.join(str(folder), '{00000..00000}.tar')


def id_tokenizer(text):
    return torch.tensor([int(text.split()[-1])])  # 'cap 7' -> [7]: which image a sample's caption came from


def dataset(root, meta, image_format, model='SLIP_TINY', epoch=1, **kw):
    args = argparse.Namespace(dataset='cc3m', root=str(root), metadata=meta, model=model, seed=0,
                              image_format=image_format, metadata_cache=None, **kw)
    ds = datasets.get_train_dataset(args, id_tokenizer)
    ds.set_epoch(epoch)
    return ds


def both(ds_worker, ds_bytes, n, loader=None):
    """The per-sample path's batch (uint8 views) and the batched path's, decoded on the CPU, for samples 0..n-1."""
    ref = augment.Batch.collate([ds_worker[i] for i in range(n)])
    sent = augment.Batch.collate([ds_bytes[i] for i in range(n)])
    return ref, sent, device_decode.decode_views(sent, 'cpu', 'cpu', ds_bytes if loader is None else loader)


def assert_views_close(ref, got):
    for name in augment.Batch.VIEWS:
        a, b = getattr(ref, name), getattr(got, name)
        if a is None:
            assert b is None
            continue
        assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8, name
        diff = (a.int() - b.int()).abs().float()
        assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (name, diff.max(), diff.mean())


def assert_same_draws(ref, got):
    for name in ('text', 'aug_params', 'n_bad', 'image_keep', 'aug1_keep', 'aug2_keep'):
        a, b = getattr(ref, name), getattr(got, name)
        assert (a is None and b is None) or torch.equal(a, b), name


@pytest.fixture
def photos(tmp_path):
    """Twelve 96x72 photo-like JPEGs of three widths, one grayscale, in cc3m layout."""
    images = [smooth_jpeg(k, size=(96 + 8 * (k % 3), 72), mode='L' if k == 4 else 'RGB') for k in range(12)]
    return tmp_path, write_cc3m(str(tmp_path), images)


# ----------------------------------------------------------------------------------------------------------------
# The same samples as the per-sample path
# ----------------------------------------------------------------------------------------------------------------
MASKED = dict(ssl_view_size=32, ssl_mask_ratio=0.5, clip_mask_ratio=0.25)


@pytest.mark.parametrize('model, extra', [('SLIP_TINY', {}), ('CLIP_TINY', {}), ('SIMCLR_TINY', {}),
                                          ('SLIP_TINY', MASKED)])
def test_batched_views_equal_the_per_sample_path_within_rounding(photos, model, extra):
    root, meta = photos
    ref, sent, got = both(dataset(root, meta, 'device_augment', model, **extra),
                          dataset(root, meta, 'jpeg', model, **extra), 12)
    assert sent.image is None and sent.aug1 is None and sent.jpeg.dtype == torch.uint8 and sent.jpeg.dim() == 1
    assert sent.jpeg_info[:, 3].sum() == 0  # every one sent as JPEG bytes, the grayscale one too
    assert_same_draws(ref, got)
    assert_views_close(ref, got)  # resized on uint8 pixels, as on the CPU
    images = device_decode.decode_images(sent, torch.device('cpu'))
    assert_views_close(ref, augment.Batch(**device_decode.crop_views(images, sent.crops, uint8=False)))  # as on GPUs
    finished, reference = augment.finish_views(got), augment.finish_views(ref)
    for name in augment.Batch.VIEWS:  # after the colour ops and normalisation, in [0, 1] pixel units
        if getattr(reference, name) is not None:
            d = (getattr(finished, name) - getattr(reference, name)).abs() * 0.229
            assert d.mean() < 1 / 255 and d.max() < 10 / 255, name


def test_crop_boxes_are_those_the_per_sample_path_draws(photos, monkeypatch):
    root, meta = photos
    drawn = []
    real = torchvision.transforms.functional.resized_crop
    monkeypatch.setattr(torchvision.transforms.functional, 'resized_crop',
                        lambda img, *a, **k: drawn.append(a[:4]) or real(img, *a, **k))
    host = views.resized_crop  # the CLIP view is cropped by views.py (the SimCLR ones above, by CropFlipParams)
    monkeypatch.setattr(views, 'resized_crop', lambda img, crop, *a: drawn.append(tuple(crop)) or host(img, crop, *a))
    ds_worker, ds_bytes = dataset(root, meta, 'device_augment'), dataset(root, meta, 'jpeg')
    for i in range(12):
        drawn.clear()
        ds_worker[i]
        assert drawn and [tuple(r) for r in ds_bytes[i].crops[:, :4].tolist()] == drawn  # (top, left, h, w) x 3


def test_images_other_than_rgb_jpegs_travel_as_pixels(tmp_path):
    cmyk = smooth_jpeg(1, mode='CMYK')
    png = smooth_jpeg(2, fmt='PNG')
    meta = write_cc3m(str(tmp_path / 'cc'), [smooth_jpeg(0), cmyk, png])
    ref, sent, got = both(dataset(tmp_path / 'cc', meta, 'device_augment'), dataset(tmp_path / 'cc', meta, 'jpeg'), 3)
    assert sent.jpeg_info[:, 3].tolist() == [0, 1, 1]  # the CMYK JPEG and the PNG were decoded in the worker
    assert sent.jpeg_info[1, 0] == 72 * 96 * 3
    assert_same_draws(ref, got)
    assert_views_close(ref, got)
    demo = [datasets.get_train_dataset(argparse.Namespace(dataset='demo', model='SLIP_TINY', seed=0, demo_samples=8,
                                                          image_format=f), lambda caption: torch.zeros(1))
            for f in ('device_augment', 'jpeg')]
    ref, sent, got = both(*demo, 4)
    assert sent.jpeg_info[:, 3].tolist() == [1] * 4  # drawn in code: pixels
    assert_same_draws(ref, got)
    assert_views_close(ref, got)


def test_a_png_in_a_shard_goes_through_the_pixel_path(tmp_path, monkeypatch):
    monkeypatch.setattr('utils.get_rank', lambda: 0)
    monkeypatch.setattr('utils.get_world_size', lambda: 1)
    urls = write_shard(tmp_path, [smooth_jpeg(k, fmt='PNG' if k == 2 else 'JPEG') for k in range(4)],
                       ['png' if k == 2 else 'jpg' for k in range(4)])
    sets = []
    for fmt in ('device_augment', 'jpeg'):
        args = argparse.Namespace(dataset='wds', root=urls, model='SLIP_TINY', seed=0, train_num_samples=4,
                                  batch_size=4, wds_shuffle_buffer=4, image_format=fmt)
        sets.append(next(iter(torch.utils.data.DataLoader(datasets.get_train_dataset(args, id_tokenizer),
                                                          batch_size=4, collate_fn=augment.Batch.collate))))
    ref, sent = sets
    png_row = sent.text[:, 0].tolist().index(2)
    assert sent.jpeg_info[:, 3].tolist() == [int(r == png_row) for r in range(4)]
    got = device_decode.decode_views(sent, 'cpu', 'cpu')
    assert_same_draws(ref, got)
    assert_views_close(ref, got)


# ----------------------------------------------------------------------------------------------------------------
# Bad images
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def with_bad(tmp_path):
    good = [smooth_jpeg(k) for k in range(8)]
    images = good[:2] + [good[2][:len(good[2]) // 2]] + good[3:5] + [b'\xff\xd8\xff\xe0' + bytes(300)] + good[6:]
    return tmp_path, write_cc3m(str(tmp_path), images)  # 2: truncated, 5: garbage after a JPEG signature


def test_bad_jpegs_are_found_in_the_worker_and_replaced_as_on_the_per_sample_path(with_bad, monkeypatch):
    root, meta = with_bad
    monkeypatch.setattr(datasets, 'warn_bad', lambda message: None)
    ref, sent, got = both(dataset(root, meta, 'device_augment'), dataset(root, meta, 'jpeg'), 8)
    assert ref.n_bad[2] >= 1 and ref.n_bad[5] >= 1 and ref.n_bad.sum() == ref.n_bad[2] + ref.n_bad[5]
    assert torch.equal(sent.n_bad, ref.n_bad) and torch.equal(sent.text, ref.text)  # the same replacements
    assert not {2, 5} & set(sent.text[:, 0].tolist())
    assert_same_draws(ref, got)
    assert_views_close(ref, got)


def test_a_jpeg_the_batched_decoder_rejects_is_decoded_alone_with_pil(photos, monkeypatch):
    root, meta = photos
    ds = dataset(root, meta, 'jpeg')
    sent = augment.Batch.collate([ds[i] for i in range(6)])
    plain = device_decode.decode_views(sent, 'cpu', 'cpu', ds)
    target = sent.jpeg.split(sent.jpeg_info[:, 0].tolist())[3].clone()
    real, calls = torchvision.io.decode_jpeg, []

    def refusing(data, **kw):  # the decoder fails on sample 3's bytes, in a batch or alone
        calls.append(len(data) if isinstance(data, list) else 1)
        if any(torch.equal(d, target) for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError('decode_jpeg: refused')
        return real(data, **kw)

    monkeypatch.setattr(torchvision.io, 'decode_jpeg', refusing)
    got = device_decode.decode_views(sent, 'cpu', 'cpu', ds)
    assert calls == [6] + [1] * 6  # the batch, then image by image
    for name in ('image', 'aug1', 'aug2', 'text', 'n_bad', 'aug_params'):  # PIL's pixels are libjpeg's here
        assert torch.equal(getattr(got, name), getattr(plain, name)), name


class TrustingLoader(device_decode.EncodedLoader):
    """A worker check that passes every JPEG whose header reads (as if a bad one slipped through)."""

    def __call__(self, source, name):
        if self.strict:
            return super().__call__(source, name)
        data = device_decode._read_bytes(source)
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
        except device_decode.IMAGE_ERRORS as e:
            raise device_decode.BadImage(f'{name}: {e}') from e
        return device_decode.EncodedImage(np.frombuffer(data, dtype=np.uint8), h, w, pixels=False)


def test_a_jpeg_that_fails_only_in_the_main_process_is_remade_as_the_per_sample_path(with_bad, monkeypatch):
    root, meta = with_bad
    monkeypatch.setattr(datasets, 'warn_bad', lambda message: None)
    ds = dataset(root, meta, 'jpeg')
    ds.source.load = TrustingLoader(lazy=True)  # as get_train_dataset installs it for a map-style dataset
    loader = torch.utils.data.DataLoader(main_script.EpochIndexed(ds), batch_size=8, collate_fn=augment.Batch.collate,
                                         sampler=[(1, i) for i in range(8)])
    sent = next(iter(loader))
    assert sent.n_bad.sum() == 1 and sent.n_bad[5] == 1  # garbage is caught by the header; 2 slipped through
    ds.set_epoch(7)  # the main process's copy may be at any epoch: the sample's own is used
    ref = augment.Batch.collate([dataset(root, meta, 'device_augment')[i] for i in range(8)])
    got = device_decode.decode_views(sent, 'cpu', 'cpu', ds)  # the map-style dataset, as DeviceBatches passes it
    assert torch.equal(sent.n_bad, ref.n_bad) and torch.equal(sent.text, ref.text)  # rewritten in the loader's batch
    assert ds.maker.epoch == 7 and not ds.source.load.strict  # left as it was
    assert_same_draws(ref, got)
    assert_views_close(ref, got)


def test_wds_a_jpeg_that_fails_only_in_the_main_process_takes_the_next_good_sample(tmp_path, monkeypatch):
    monkeypatch.setattr('utils.get_rank', lambda: 0)
    monkeypatch.setattr('utils.get_world_size', lambda: 1)
    monkeypatch.setattr('samples.warn_bad', lambda message: None)
    images = [smooth_jpeg(k) for k in range(4)]
    images[1] = images[1][:len(images[1]) // 2]
    urls = write_shard(tmp_path, images, ['jpg'] * 4)
    args = argparse.Namespace(dataset='wds', root=urls, model='SLIP_TINY', seed=0, train_num_samples=4, batch_size=4,
                              wds_shuffle_buffer=1, image_format='jpeg')
    ds = datasets.get_train_dataset(args, id_tokenizer)
    ds.load = TrustingLoader()
    sent = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=augment.Batch.collate)))
    assert sent.text[:, 0].tolist() == [0, 1, 2, 3] and sent.n_bad.sum() == 0  # buffer 1: in order
    got = device_decode.decode_views(sent, 'cpu', 'cpu', ds)
    assert got.text[:, 0].tolist() == [0, 2, 2, 3] and got.n_bad.tolist() == [0, 1, 0, 0]
    assert torch.equal(got.aug1[1], got.aug1[2]) and torch.equal(got.aug_params[1], got.aug_params[2])


# ----------------------------------------------------------------------------------------------------------------
# The Batch's bytes
# ----------------------------------------------------------------------------------------------------------------
def test_batch_bytes_collate_chunk_cat_and_stay_on_the_host(photos):
    root, meta = photos
    ds = dataset(root, meta, 'jpeg')
    sent = augment.Batch.collate([ds[i] for i in range(6)])
    assert len(sent) == 6 and sent.jpeg.numel() == int(sent.jpeg_info[:, 0].sum()) and sent.crops.shape == (6, 3, 6)
    parts = sent.chunk(3)
    assert [len(p) for p in parts] == [2, 2, 2]
    assert all(p.jpeg.numel() == int(p.jpeg_info[:, 0].sum()) for p in parts)
    whole, pieces = device_decode.decode_views(sent, 'cpu'), [device_decode.decode_views(p, 'cpu') for p in parts]
    assert torch.equal(torch.cat([p.aug2 for p in pieces]), whole.aug2)  # the bytes split where the samples do
    again = augment.Batch.cat(parts)
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), sent.tensors().values()))
    moved = sent.to('meta')  # every field moves but the host's: the bytes, their sizes and the crop boxes
    assert moved.text.device.type == 'meta' and moved.jpeg is sent.jpeg and moved.crops is sent.crops
    plain = augment.Batch(image=torch.zeros(2, 4, 4, 3, dtype=torch.uint8), n_bad=torch.zeros(2, dtype=torch.long))
    assert plain.to('meta').image.device.type == 'meta' and len(plain) == 2  # without bytes: as before


# ----------------------------------------------------------------------------------------------------------------
# main.py
# ----------------------------------------------------------------------------------------------------------------
def parse(*argv):
    return argparse.ArgumentParser(parents=[main_script.get_args_parser()]).parse_args([str(a) for a in argv])


def test_flag_validation_and_what_it_implies(monkeypatch):
    base = ('--dataset', 'demo', '--model', 'SLIP_TINY', '--eval-dataset', 'none')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit, match='--decode-device cuda needs a CUDA GPU'):
        main_script.check_args(parse(*base, '--decode-device', 'cuda'))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    with pytest.raises(SystemExit, match='cannot train on --device cpu'):
        main_script.check_args(parse(*base, '--decode-device', 'cuda', '--device', 'cpu'))
    main_script.check_args(parse(*base, '--decode-device', 'cuda', '--device', 'cuda:1'))
    with pytest.raises(SystemExit):
        parse(*base, '--decode-device', 'gpu')  # argparse names the choices
    for extra in ((), ('--device-augment',)):  # the workers' format is decided in one place: train_data.py
        args = parse(*base, '--decode-device', 'cpu', *extra)
        main_script.resolve_args(args, torch.device('cpu'))
        assert train_data.image_format(args) == 'jpeg'
    args = parse(*base)
    main_script.resolve_args(args, torch.device('cpu'))
    assert (args.decode_device, train_data.image_format(args), args.device_augment) == ('worker', 'uint8', False)
    assert 'decode_device' in main_script.RESUME_FIELDS


def _cli(out, root, meta, extra=()):
    cmd = [sys.executable, 'main.py', '--dataset', 'cc3m', '--root', root, '--metadata', meta, '--model', 'SLIP_TINY',
           '--batch-size', 4, '--epochs', 1, '--workers', 2, '--precision', 'fp32', '--decode-device', 'cpu',
           '--output-dir', out, '--print-freq', 100, '--eval-dataset', 'none', '--metadata-cache', 'none', *extra]
    return [str(c) for c in cmd], dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


@pytest.fixture
def decoded(monkeypatch):
    """The sizes of the micro-batches main.py decoded in this process."""
    sizes, real = [], device_decode.decode_views
    monkeypatch.setattr(device_decode, 'decode_views', lambda batch, *a: sizes.append(len(batch)) or real(batch, *a))
    return sizes


def test_main_trains_with_decode_device_cpu_and_update_freq_2(with_bad, tmp_path, decoded):
    root, meta = with_bad
    args = parse(*_cli(tmp_path / 'run', root, meta, ['--update-freq', 2, '--batch-size', 2, '--workers', 0,
                                                       '--max-bad-fraction', 0.5])[0][2:])
    stats = main_script.main(args)
    assert decoded == [2] * 4  # 2 steps of 2 micro-batches of 2, each decoded on its own
    assert stats['train_bad_samples'] >= 2 and np.isfinite(stats['train_loss'])  # both bad images counted
    ckpt = torch.load(tmp_path / 'run' / 'checkpoint.pt', weights_only=True)
    ckpt['args']['device_augment'], ckpt['epoch'] = True, 0  # as the previous release stored --decode-device runs
    torch.save(ckpt, tmp_path / 'run' / 'checkpoint.pt')
    main_script.main(parse(*_cli(tmp_path / 'run', root, meta, ['--update-freq', 2, '--batch-size', 2, '--workers', 0,
                                                                 '--max-bad-fraction', 0.5])[0][2:]))
    with pytest.raises(SystemExit, match="--decode-device: checkpoint 'cpu', now 'worker'"):
        main_script.main(parse(*_cli(tmp_path / 'run', root, meta, ['--update-freq', 2, '--batch-size', 2,
                                                                     '--decode-device', 'worker'])[0][2:]))


def test_main_trains_on_wds_shards_with_decode_device_cpu(tmp_path, decoded):
    urls = write_shard(tmp_path / 'shards', [smooth_jpeg(k, fmt='PNG' if k == 3 else 'JPEG') for k in range(8)],
                       ['png' if k == 3 else 'jpg' for k in range(8)])
    args = parse('--dataset', 'wds', '--root', urls, '--train-num-samples', 8, '--model', 'SLIP_TINY', '--batch-size',
                 2, '--update-freq', 2, '--epochs', 1, '--workers', 2, '--precision', 'fp32', '--decode-device', 'cpu',
                 '--output-dir', tmp_path / 'run', '--eval-dataset', 'none')
    stats = main_script.main(args)
    assert decoded == [2] * 4 and stats['train_bad_samples'] == 0 and np.isfinite(stats['train_loss'])


@pytest.mark.slow
def test_sigkill_and_restart_with_decode_device_cpu_equals_uninterrupted_bitwise(with_bad, tmp_path,
                                                                                   sigkill_and_rerun):
    root, meta = with_bad
    # 2 bad images of 8: a resumed half-epoch may draw mostly bad ones, and this test is about resume, not the limit
    extra = ['--epochs', 2, '--save-every-steps', 1, '--max-bad-fraction', 0.9, '--update-freq', 2, '--batch-size', 2]
    cmd, env = _cli(tmp_path / 'ref', root, meta, extra)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    cmd, env = _cli(tmp_path / 'killed', root, meta, extra)
    sigkill_and_rerun(cmd, env, tmp_path / 'killed' / 'checkpoint.pt', step=1)
    assert_same_weights(tmp_path / 'ref' / 'checkpoint.pt', tmp_path / 'killed' / 'checkpoint.pt')


# ----------------------------------------------------------------------------------------------------------------
# bench.py
# ----------------------------------------------------------------------------------------------------------------
def test_bench_data_measures_the_decode_configuration(tmp_path):
    argv = ['data', '--dataset', 'yfcc15m', '--root', tmp_path, '--metadata', tmp_path / 'm.pkl', '--model',
            'SLIP_TINY', '--num-samples', 16, '--make-fixture', '--fixture-archive-size', 16, '--device-augment',
            '--decode-device', 'cpu', '--device', 'cpu']
    rows = bench.main(argparse.ArgumentParser(parents=[bench.get_args_parser()]).parse_args([str(a) for a in argv]))
    assert [r['config'] for r in rows] == ['fast', 'fast+device_augment', 'decode=cpu']
    assert all(r['samples_per_s'] > 0 and r['host_cpu_s_per_sample'] > 0 for r in rows)
    assert rows[2]['device_ms_per_sample'] > rows[2]['decode_views_ms_per_sample'] > 0
    assert rows[1]['decode_views_ms_per_sample'] is None  # the decode is timed for the decode configuration only
