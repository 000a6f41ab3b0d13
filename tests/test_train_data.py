"""train_data.py: the loader main.py trains from, its batches finished on the device one batch ahead (on the CPU
here: the same code without streams), bitwise those of the plain path. main.py's SIGKILL-and-resume runs with
--decode-device cpu (tests/test_device_decode.py) go through the prefetching iterator too."""
import argparse

import pytest
import torch

import datasets
import device_decode
import main as main_script
import train_data
from test_device_decode import TrustingLoader, id_tokenizer, smooth_jpeg, write_cc3m


def loader_args(root, meta, **kw):
    base = dict(dataset='cc3m', root=str(root), metadata=meta, metadata_cache=None, model='SLIP_TINY', seed=3,
                batch_size=3, workers=0, rank=0, world_size=1, decode_device='cpu', device_augment=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def cc3m(tmp_path, monkeypatch):
    """Ten JPEGs of three sizes; image 4 is garbage after a JPEG header that the worker lets through, so the main
    process finds it and makes its sample again (drawing under seeded streams)."""
    monkeypatch.setattr(datasets, 'warn_bad', lambda message: None)
    images = [smooth_jpeg(k, size=(80 + 8 * (k % 3), 64)) for k in range(10)]
    images[4] = images[4][:200] + bytes(400)
    return tmp_path, write_cc3m(str(tmp_path), images)


def epoch_batches(args, prefetch, epoch=1, start=0):
    """Every batch of ``epoch`` from ``start``, as the engine reads them: a random draw between batches (a step's
    dropout), recorded with the batch."""
    batches, sampler, _ = train_data.build_train_loader(args, id_tokenizer, torch.device('cpu'))
    batches.prefetch = prefetch
    batches.loader.dataset.dataset.source.load = TrustingLoader(lazy=True)
    sampler.set_epoch(epoch, start, args.batch_size)
    torch.manual_seed(0)  # the training process's streams, as at the start of an epoch
    out = []
    for batch in batches:
        out.append((batch, torch.rand(2)))
    return out


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for (x, rx), (y, ry) in zip(a, b):
        assert torch.equal(rx, ry)
        assert x.tensors().keys() == y.tensors().keys()
        assert all(torch.equal(v, getattr(y, k)) for k, v in x.tensors().items())


def test_prefetching_yields_the_plain_paths_batches_bitwise(cc3m):
    root, meta = cc3m
    args = loader_args(root, meta)
    plain, ahead = epoch_batches(args, prefetch=False), epoch_batches(args, prefetch=True)
    assert sum(int(b.n_bad.sum()) for b, _ in plain) >= 1  # the bad image was met and replaced
    assert_same(plain, ahead)
    assert plain[0][0].aug1.dtype == torch.float32 and plain[0][0].jpeg is None  # finished: the model's inputs
    assert_same(epoch_batches(args, prefetch=False, start=1), epoch_batches(args, prefetch=True, start=1))


def test_prefetching_finishes_the_next_batch_before_handing_over_this_one(cc3m, monkeypatch):
    root, meta = cc3m
    batches, sampler, _ = train_data.build_train_loader(loader_args(root, meta), id_tokenizer, torch.device('cpu'))
    sampler.set_epoch(0)
    finished, real = [], device_decode.finish_batch
    monkeypatch.setattr(device_decode, 'finish_batch', lambda b, *a: finished.append(len(b)) or real(b, *a))
    it = iter(batches)
    next(it)
    assert finished == [3, 3]  # batch 0 handed over, batch 1 already made
    assert len(list(it)) == len(batches) - 1 and len(finished) == len(batches)


@pytest.mark.parametrize('flags, expected', [({}, 'jpeg'), ({'decode_device': 'worker'}, 'uint8'),
                                             ({'decode_device': 'worker', 'device_augment': True}, 'device_augment')])
def test_the_workers_format_follows_decode_device_and_device_augment(flags, expected):
    assert train_data.image_format(loader_args('', '', **flags)) == expected


def test_main_keeps_its_sampler_names():
    assert main_script.EpochSampler is train_data.EpochSampler and main_script.EpochIndexed is train_data.EpochIndexed


def test_bench_input_times_each_stage_of_the_decode_path_apart(cc3m):
    import bench_input
    root, meta = cc3m
    batches, sampler, _ = train_data.build_train_loader(loader_args(root, meta), id_tokenizer, torch.device('cpu'))
    sampler.set_epoch(0)
    raw = list(batches.loader)[:2]
    row = bench_input.stage_rows(raw, batches.dataset, torch.device('cpu'), 'cpu')
    stages = ('decode', 'crops_batched', 'crops_per_crop', 'colour_blur')
    assert all(row[f'{k}_ms_per_256'] > 0 for k in stages)
    assert row['overlap'] is None and row['per_crop_kind'] == 'uint8 kernel'  # no streams on the CPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (bench_gpu.sh runs it there)')
def test_on_cuda_the_side_stream_batches_equal_the_plain_paths_bitwise(cc3m):
    root, meta = cc3m
    args = loader_args(root, meta, decode_device='cuda')
    device = torch.device('cuda')

    def run(prefetch):
        batches, sampler, _ = train_data.build_train_loader(args, id_tokenizer, device)
        batches.prefetch = prefetch
        batches.loader.dataset.dataset.source.load = TrustingLoader(lazy=True)
        sampler.set_epoch(1)
        out = []
        for batch in batches:
            torch.cuda._sleep(1_000_000)  # a slow step on the training stream while the next batch is made
            out.append((batch.apply(lambda t: t.cpu()), torch.zeros(2)))
        return out
    plain, ahead = run(False), run(True)
    assert plain[0][0].aug1.dtype == torch.float32
    assert_same(plain, ahead)
