"""WebDataset shards: the same number of batches on every rank, a seeded sample-level shuffle, and a mid-epoch resume
that continues at the exact next sample, in the dataset and end to end (main.py killed and restarted, bitwise)."""
import argparse
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import augment
import datasets
import utils
from conftest import assert_same_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_shards(folder, sizes, corrupt=(), image_size=16):
    """img2dataset-layout shards in ``folder``; sample k has caption 'sample <k>' and a colour from k.
    Returns the brace pattern. Samples listed in ``corrupt`` (as k) hold undecodable bytes."""
    os.makedirs(folder, exist_ok=True)
    k = 0
    for s, n in enumerate(sizes):
        with tarfile.open(os.path.join(folder, f'{s:05d}.tar'), 'w') as tar:
            for pos in range(n):
                buf = io.BytesIO()
                pixels = np.full((image_size, image_size, 3), (k * 7 % 256, k * 13 % 256, 90), np.uint8)
                pixels[:, : image_size // 2, 1] = 255 - k  # not uniform, so crops differ
                Image.fromarray(pixels).save(buf, format='PNG')
                image = b'not an image' if k in corrupt else buf.getvalue()
                for name, data in ((f'{s:05d}{pos:04d}.png', image), (f'{s:05d}{pos:04d}.txt', f'sample {k}'.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
    return os.path.join(str(folder), f'{{00000..{len(sizes) - 1:05d}}}.tar')


def id_tokenizer(text):
    return torch.tensor([int(text.split()[-1])])  # 'sample 7' -> [7]: which sample a batch row came from


def make(monkeypatch, urls, num_samples, batch_size, rank=0, world_size=1, buffer=1000):
    monkeypatch.setattr(utils, 'get_rank', lambda: rank)
    monkeypatch.setattr(utils, 'get_world_size', lambda: world_size)
    args = argparse.Namespace(dataset='wds', root=urls, model='CLIP_TINY', seed=0, train_num_samples=num_samples,
                              batch_size=batch_size, wds_shuffle_buffer=buffer)
    return datasets.get_train_dataset(args, id_tokenizer)


def batches(ds, workers, epoch=0, start_batch=0):
    ds.set_epoch(epoch, start_batch, ds.batch_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=ds.batch_size, num_workers=workers, drop_last=True,
                                         collate_fn=augment.Batch.collate)
    return list(loader)


def ids(batch_list):
    return [b.text.flatten().tolist() for b in batch_list]


def test_every_sample_exactly_once_over_two_ranks_and_two_workers(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, [2] * 8)  # 16 samples; 4 workers in all read 2 shards each
    seen = []
    for rank in (0, 1):
        got = batches(make(monkeypatch, urls, 16, 2, rank, 2), workers=2)
        assert len(got) == 4 and all(b.image.shape == (2, 3, 64, 64) for b in got)
        seen += sum(ids(got), [])
    assert sorted(seen) == list(range(16))


def test_every_rank_gets_the_same_number_of_batches_from_uneven_shards(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, [7, 1, 1, 1, 5, 1])  # 16 samples, very unevenly split over 2 ranks x 2 workers
    counts = [len(batches(make(monkeypatch, urls, 16, 2, rank, 2), workers=2)) for rank in (0, 1)]
    assert counts == [4, 4]  # 16 // 2 ranks // batch 2; short workers read their shards again


def test_samples_are_shuffled_within_shards_and_the_shuffle_is_seeded_per_epoch(tmp_path, monkeypatch):
    urls = write_shards(tmp_path, [16, 16])
    ds = make(monkeypatch, urls, 32, 8, buffer=16)
    epoch0 = sum(ids(batches(ds, workers=0, epoch=0)), [])
    assert sorted(epoch0) == list(range(32))  # one pass: each sample once
    runs = [epoch0[i:i + 8] for i in range(0, 32, 8)]
    assert not any(r == sorted(r) and r[-1] - r[0] == 7 for r in runs)  # no batch is 8 consecutive samples
    assert epoch0 == sum(ids(batches(ds, workers=0, epoch=0)), [])  # seeded: the same again
    assert epoch0 != sum(ids(batches(ds, workers=0, epoch=1)), [])  # another epoch, another order
    sequential = sum(ids(batches(make(monkeypatch, urls, 32, 8, buffer=1), workers=0)), [])
    assert sequential in (list(range(32)), list(range(16, 32)) + list(range(16)))  # buffer 1: no sample shuffle


@pytest.mark.parametrize('start', [1, 2, 3, 5])
def test_resume_mid_epoch_continues_at_the_exact_next_sample(tmp_path, monkeypatch, start):
    urls = write_shards(tmp_path, [5, 3, 6, 2])  # 16 samples, 2 workers
    full = batches(make(monkeypatch, urls, 16, 2), workers=2, epoch=1)
    resumed = batches(make(monkeypatch, urls, 16, 2), workers=2, epoch=1, start_batch=start)
    assert len(full) == 8 and len(resumed) == 8 - start
    for a, b in zip(full[start:], resumed, strict=True):  # the same samples with the same views, bitwise
        x, y = a.tensors(), b.tensors()
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_bad_image_is_replaced_and_counted_without_shifting_the_stream(tmp_path, monkeypatch):
    urls = write_shards(tmp_path / 'bad', [4, 4], corrupt={5})
    got = batches(make(monkeypatch, urls, 8, 2), workers=0)
    assert len(got) == 4 and sum(int(b.n_bad.sum()) for b in got) == 1
    flat = sum(ids(got), [])
    assert 5 not in flat and len(set(flat)) == 7  # a sample drawn from the buffer stands in for it
    good = write_shards(tmp_path / 'good', [4, 4])
    reference = sum(ids(batches(make(monkeypatch, good, 8, 2), workers=0)), [])
    assert [a for a, b in zip(flat, reference) if a != b] == [flat[reference.index(5)]]  # only that one differs


def _cli(out, urls, extra=()):
    cmd = [sys.executable, 'main.py', '--dataset', 'wds', '--root', urls, '--train-num-samples', 48,
           '--model', 'SLIP_TINY', '--batch-size', 4, '--epochs', 2, '--workers', 2, '--precision', 'fp32',
           '--output-dir', out, '--save-every-steps', 1, '--print-freq', 100, '--eval-dataset', 'none',
           '--wds-shuffle-buffer', 8, *extra]
    return [str(c) for c in cmd], dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')


@pytest.mark.slow
def test_wds_sigkill_and_restart_equals_uninterrupted_bitwise(tmp_path, sigkill_and_rerun):
    urls = write_shards(tmp_path / 'shards', [9, 7, 12, 5, 8, 7])  # 48 samples: 12 steps per epoch
    cmd, env = _cli(tmp_path / 'ref', urls)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    cmd, env = _cli(tmp_path / 'killed', urls)
    killed_at = sigkill_and_rerun(cmd, env, tmp_path / 'killed' / 'checkpoint.pt', step=5)
    # killed after an odd step: worker 1's turn is next
    assert killed_at['data_position']['samples_per_worker'] == [
        (killed_at['step'] // 2 + (w < killed_at['step'] % 2)) * 4 for w in range(2)]
    assert utils.load_checkpoint(str(tmp_path / 'killed' / 'checkpoint.pt'))['epoch'] == 2
    assert_same_weights(tmp_path / 'ref' / 'checkpoint.pt', tmp_path / 'killed' / 'checkpoint.pt')


def test_wds_resume_with_other_workers_is_refused(tmp_path):
    urls = write_shards(tmp_path / 'shards', [8, 8])
    cmd, env = _cli(tmp_path / 'run', urls, ['--epochs', 1, '--train-num-samples', 16, '--save-every-steps', 0])
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    result = subprocess.run(cmd + ['--workers', '1'], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and '--workers: checkpoint 2, now 1' in result.stderr
    assert 'Traceback' not in result.stderr
