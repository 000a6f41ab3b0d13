"""progress.py and the progress lines of the long jobs: make_dataset, the metadata cache build, zero-shot, retrieval."""
import json
import logging
import os
import pickle
import re

import numpy as np
import pytest
import torch

import eval_zeroshot as ez
import make_dataset
import metadata
import models
import progress
import utils
from test_eval_zeroshot import COLORS, make_assets, write_image


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def every_update(monkeypatch):
    """The jobs' progress interval forced to 0 s: a line on every update."""
    monkeypatch.setenv(progress.INTERVAL_ENV, '0')


@pytest.fixture
def logs():
    """The messages the ``slip`` logger emits at INFO and above during the test."""
    records, handler, level = [], logging.Handler(), utils.logger.level
    handler.emit = lambda record: records.append(record.getMessage())
    utils.logger.addHandler(handler)
    utils.logger.setLevel(logging.INFO)
    yield records
    utils.logger.removeHandler(handler)
    utils.logger.setLevel(level)


# ----------------------------------------------------------------------------------------------------------------
# The helper
# ----------------------------------------------------------------------------------------------------------------
def test_rate_and_eta_against_a_fake_clock_with_lines_at_most_every_interval():
    clock, lines = FakeClock(), []
    p = progress.Progress('job', total=100, unit='items', interval=10, clock=clock, log=lines.append, rank=0)
    p.update(10)
    clock.now = 5.0
    p.update(10)
    assert lines == []  # 5 s < the 10 s interval
    clock.now = 10.0
    p.update(5)  # 25 of 100 in 10 s: 2.5 items/s, 75 left -> 30 s
    assert lines == ['job [25/100 items]  2.5 items/s  ETA 0:00:30']
    clock.now = 15.0
    p.update(25)
    assert len(lines) == 1  # 5 s since the last line
    clock.now = 20.0
    p.update(10, kept=7)  # 60 of 100 in 20 s: 3 items/s, 40 left -> 13.3 s
    assert lines[1] == 'job [60/100 items]  3 items/s  ETA 0:00:13  kept 7'
    clock.now = 40.0
    p.update(40)  # the last unit: the end line is finish()'s, not this one
    p.finish()
    p.finish()  # once
    assert lines[2:] == ['job [100/100 items]  done in 0:00:40  2.5 items/s  kept 7']


def test_eta_comes_from_bytes_read_of_the_size_when_the_total_is_unknown():
    clock, lines, read = FakeClock(), [], [0]
    p = progress.Progress('scan', unit='lines', size=4 * 2 ** 20, position=lambda: read[0], interval=0,
                          clock=clock, log=lines.append, rank=0)
    clock.now, read[0] = 20.0, 2 ** 20  # a quarter of 4 MB in 20 s -> 60 s left
    p.update(1000)
    assert lines == ['scan [1,000 lines]  50 lines/s  1.0 MB of 4.0 MB (25.0%)  ETA 0:01:00']


def test_eta_is_unknown_before_anything_is_done():
    p = progress.Progress('job', total=10, interval=0, clock=FakeClock(), log=print, rank=0)
    assert progress.eta(0, 10, 5.0) == float('inf') and p.line(3.0).endswith('ETA ?')


def test_a_failure_part_way_says_how_far_it_got():
    clock, lines = FakeClock(), []
    with pytest.raises(RuntimeError, match='disk gone'):
        with progress.Progress('job', total=10, interval=100, clock=clock, log=lines.append, rank=0) as p:
            p.update(3)
            clock.now = 65.0
            raise RuntimeError('disk gone')
    assert lines == ['job: stopped by RuntimeError at [3/10 items] after 0:01:05']


def test_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, '7.5')
    assert progress.Progress('job', log=print).interval == 7.5
    monkeypatch.setenv(progress.INTERVAL_ENV, 'soon')
    with pytest.raises(ValueError, match='SLIP_PROGRESS_SECONDS'):
        progress.Progress('job', log=print)


def test_rank_1_prints_no_progress_but_its_failure(monkeypatch):
    monkeypatch.setattr(utils, 'get_rank', lambda: 1)  # the default rank comes from utils.get_rank()
    lines = []
    with progress.Progress('job', total=4, interval=0, log=lines.append) as p:
        p.update(2)
        p.update(2)
    assert lines == []
    with pytest.raises(KeyError):
        with progress.Progress('job', total=4, interval=0, log=lines.append) as p:
            p.update(2)
            raise KeyError('x')
    assert lines == ['job (rank 1): stopped by KeyError at [2/4 items] after 0:00:00']


def _two_ranks(rank, world, init_file, out_dir):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    lines = []
    with progress.Progress('job', total=3, interval=0, log=lines.append) as p:  # rank from the process group
        for _ in range(3):
            p.update()
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(lines, f)
    dist.destroy_process_group()


@pytest.mark.dist
def test_nothing_is_printed_on_rank_1_of_a_two_process_gloo_group(tmp_path):
    torch.multiprocessing.start_processes(_two_ranks, args=(2, str(tmp_path / 'init'), str(tmp_path)), nprocs=2,
                                          start_method='fork')
    rank0, rank1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1))
    assert [line.split(']')[0] for line in rank0] == ['job [1/3 items', 'job [2/3 items', 'job [3/3 items']
    assert rank1 == []


# ----------------------------------------------------------------------------------------------------------------
# The jobs, on small inputs, with a line on every update
# ----------------------------------------------------------------------------------------------------------------
def _yfcc_inputs(tmp_path, rows):
    def line(photo_id):
        return '\t'.join([str(photo_id), 'h', 'u', 'n', 'd', 'd', 'dev', 'x', f'title+{photo_id}', 'desc', 't']) + '\n'
    np.save(tmp_path / 'ids.npy', np.array([1, 2, 3, 5], dtype=np.int64))
    (tmp_path / 'subset.tsv').write_text('photoid\n1\n3\n4\n')
    (tmp_path / 'meta.txt').write_text(''.join(line(i) if isinstance(i, int) else i for i in rows))
    return make_dataset.get_args_parser().parse_args(
        ['--ids', str(tmp_path / 'ids.npy'), '--subset', str(tmp_path / 'subset.tsv'),
         '--metadata', str(tmp_path / 'meta.txt'), '--output-dir', str(tmp_path)])


def _progress_lines(text, what):
    return [line for line in text.splitlines() if line.startswith(what + ' [')]


def test_make_dataset_prints_lines_read_bytes_of_the_size_and_photos_kept(tmp_path, capsys, every_update):
    args = _yfcc_inputs(tmp_path, [3, 1, 2, 4])  # downloaded: 3, 1, 2; in the subset too: 3, 1
    make_dataset.main(args)
    lines = _progress_lines(capsys.readouterr().out, 'make_dataset')
    size = os.path.getsize(args.metadata)
    counts = [re.match(r'make_dataset \[(\d) lines\]', line).group(1) for line in lines]
    assert counts == ['1', '2', '3', '4', '4']  # a line per line read, then the end line
    assert 'kept 2' in lines[3] and 'lines/s' in lines[0] and 'ETA' in lines[0]  # kept: photos 3 and 1 before line 4
    assert 'done in' in lines[4] and f'{size} B of {size} B (100.0%)' in lines[4] and lines[4].endswith('kept 2')


def test_make_dataset_that_fails_part_way_says_how_far_it_got(tmp_path, capsys, every_update):
    args = _yfcc_inputs(tmp_path, [3, 1, 'not a metadata line\n', 4])
    with pytest.raises(ValueError, match='meta.txt:3'):
        make_dataset.main(args)
    assert 'make_dataset: stopped by ValueError at [3 lines], ' in capsys.readouterr().out


def test_metadata_cache_build_prints_records_done_rate_and_eta(tmp_path, logs, every_update, monkeypatch):
    path = tmp_path / 'yfcc15m.pkl'
    with open(path, 'wb') as f:
        pickle.dump([(k, f'title {k}', f'description {k}') for k in range(5)], f)
    monkeypatch.setattr(metadata, 'PACK_CHUNK', 2)  # chunks of 2 records: lines at 2 and 4, the end at 5
    compact = metadata.load_metadata('yfcc15m', str(path), str(tmp_path / 'cache'))
    assert compact.origin is not None and compact[4] == (4, 'title 4', 'description 4')
    lines = _progress_lines('\n'.join(logs), 'metadata cache yfcc15m')
    assert [line.split(']')[0].split('[')[1] for line in lines] == ['2/5 records', '4/5 records', '5/5 records']
    assert 'records/s' in lines[0] and 'ETA' in lines[0] and 'done in' in lines[2]


def test_zeroshot_prints_set_k_of_n_images_encoded_and_keeps_the_table_last(tmp_path, logs, every_update,
                                                                            released_checkpoint):
    files = make_assets(tmp_path)  # 7 images
    released_checkpoint(tmp_path / 'clip.pt', name='CLIP_TINY')
    ez.main(ez.get_args_parser().parse_args([
        '--resume', str(tmp_path / 'clip.pt'), '--datasets', 'toy', 'toylist', '--catalog', files['catalog'],
        '--labels', files['labels'], '--templates', files['templates'], '--output-dir', str(tmp_path / 'out'),
        '-j', '0', '--device', 'cpu', '--batch-size', '3']))
    shown = [m for m in logs if m.startswith('set ') or ' images]' in m]
    assert [m.split(']')[0] for m in shown] == [
        'set 1 of 2: toy', 'toy [3/7 images', 'toy [6/7 images', 'toy [7/7 images',  # batches of 3, then the end
        'set 2 of 2: toylist', 'toylist [3/7 images', 'toylist [6/7 images', 'toylist [7/7 images']
    assert 'images/s' in shown[1] and 'ETA' in shown[1] and 'done in' in shown[3]
    assert logs[-3].startswith('dataset') and logs[-2].startswith('toy ') and logs[-1].startswith('toylist ')


def test_retrieval_prints_images_and_captions_encoded(tmp_path, logs, every_update, tokenizer):
    rows = []
    for i, color in enumerate(COLORS):
        write_image(tmp_path / 'imgs' / f'{i}.jpg', color, i)
        rows.append({'filename': f'{i}.jpg', 'split': 'test', 'sentences': [{'raw': f'image {i} {j}'} for j in
                                                                             range(5)]})
    (tmp_path / 'karpathy.json').write_text(json.dumps({'images': rows}))
    catalog = {'flickr': {'path': str(tmp_path), 'type': 'retrieval_karpathy', 'images': 'imgs',
                          'captions': 'karpathy.json'}}
    torch.manual_seed(0)
    ez.zeroshot_dataset(models.create_model('CLIP_TINY'), 'flickr', (catalog, {}, {}), tokenizer, 'cpu', 2, 0)
    counts = [m.split(']')[0] for m in logs if m.startswith('flickr [')]
    assert counts == ['flickr [2/3 images', 'flickr [3/3 images']
    captions = [m for m in logs if m.startswith('flickr captions [')]
    assert [m.split(']')[0] for m in captions] == [f'flickr captions [{k}/15 texts'
                                                   for k in (2, 4, 6, 8, 10, 12, 14, 15)]  # batches of 2, the end
