"""Benchmarks of the input pipeline (``bench.py data``): reading, decoding, every view, tokenizing and collating in
the DataLoader's workers, on YFCC-layout zips made here; and the memory of the pre-training metadata
(``bench.py data --metadata-memory``: Python lists vs compact arrays memory-mapped from the per-node cache).

The CLI and the commands are in bench.py.
"""
import argparse
import io
import json
import os
import pickle
import resource
import statistics
import time

import numpy as np
import torch

import augment
import bench_input
import bench_original
import checkpoints
import device_decode
import samples
import utils
import views
from bench_train import _sync


def make_yfcc_fixture(root, metadata, n, seed=0, per_zip=1000, size=(500, 375)):
    """YFCC layout (images/<2>/<3>.zip holding <3>.jpg) with n photos of ``size`` (YFCC15M's 500x375 by default),
    per_zip members per archive."""
    import zipfile
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, 'images', '00'), exist_ok=True)
    records = []
    for start in range(0, max(n, per_zip), per_zip):
        with zipfile.ZipFile(os.path.join(root, 'images', '00', f'{start // per_zip:03d}.zip'), 'w') as zf:
            for j in range(per_zip):  # full archives, so reopening costs what it costs on real data
                photo_id = start + j
                base = rng.integers(0, 255, (47, 63, 3), dtype=np.uint8)
                img = Image.fromarray(base).resize(tuple(size), Image.BICUBIC)  # smooth, JPEG-like content
                buf = io.BytesIO()
                img.save(buf, format='JPEG', quality=90)
                zf.writestr(f'{j:03d}.jpg', buf.getvalue())
                records.append((photo_id, f'photo number {photo_id} of a landscape', f'description {photo_id}'))
    with open(metadata, 'wb') as f:
        pickle.dump(records[:n] if n >= per_zip else records, f)


def _cpu_seconds():
    """CPU time of this process (all its threads) and of its waited-for children (DataLoader workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _data_configs(args):
    """(name, dataset, image format): the original SLIP's dataset code (bench_original.py), the default host path
    (what main.py runs: zips kept open, views.py's views handed over as uint8), with --device-augment main.py
    --device-augment, and with --decode-device main.py --decode-device (the workers send bytes)."""
    import datasets
    import models
    configs = []
    if args.compare or args.baseline:
        if args.dataset != 'yfcc15m':
            raise ValueError('the original\'s configuration reads the yfcc15m zip layout (--dataset yfcc15m)')
        spec = models.get_spec(args.model)
        configs.append(('original', bench_original.OriginalYFCC(args.root, args.metadata, spec.family,
                                                                spec.image_size), 'float'))
    formats = ([] if args.baseline else ['uint8']) + (['device_augment'] if args.device_augment else [])
    for fmt in formats:
        args.image_format = fmt
        ds = datasets.get_train_dataset(args, utils.Tokenizer())
        ds.set_epoch(0)
        configs.append(('fast' if fmt == 'uint8' else 'fast+device_augment', ds, fmt))
    if args.decode_device:
        args.image_format = 'jpeg'
        ds = datasets.get_train_dataset(args, utils.Tokenizer())
        ds.set_epoch(0)
        configs.append((f'decode={args.decode_device}', ds, 'jpeg'))
    return configs


def _timed_batches(loaders, workers):
    """Yields (config index, batch, wall seconds, CPU seconds) for every batch of every loader. With workers=0, batch
    by batch in turn (load changes on a shared machine hit every configuration alike), each batch's own time; with
    workers, one loader after the other, its whole time (the last batch's includes the workers' exit, after which
    their CPU time is counted)."""
    iterators, live = [None] * len(loaders), list(range(len(loaders)))
    while live:
        for k in list(live) if not workers else live[:1]:
            t, c = time.perf_counter(), _cpu_seconds()
            if iterators[k] is None:
                iterators[k] = iter(loaders[k])  # workers start here, on their configuration's clock
            batch = next(iterators[k], None)
            wall, cpu = time.perf_counter() - t, _cpu_seconds() - c
            if batch is None:
                live.remove(k)
            yield k, batch, wall, cpu


def bench_data(args):
    """The input pipeline alone: read, decode, every view, tokenize, collate, per configuration (_data_configs), in
    3 repetitions, interleaved batch by batch with --workers 0; samples/s from the median wall time and host CPU
    seconds per sample (the process's and its workers'). With --device-augment the batched colour/blur on --device
    is timed apart (``device_ms_per_sample``). ``--profile N`` adds a cProfile of the fast path's samples (top N by
    own time), ``--stages`` the fast path's time per stage (``stage_times``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker: tiny tensor ops must not wait on a thread pool
    if args.make_fixture and not os.path.exists(args.metadata):
        make_yfcc_fixture(args.root, args.metadata, args.num_samples, args.seed, args.fixture_archive_size,
                          tuple(int(v) for v in args.fixture_size.split('x')))
    args.demo_samples, args.train_num_samples = args.num_samples, args.num_samples
    if args.stages and args.dataset != 'yfcc15m':
        raise ValueError('--stages times the yfcc15m zip reader (--dataset yfcc15m)')
    configs = _data_configs(args)
    device = utils.resolve_device(args.device) if args.device_augment or args.decode_device else None
    n = min(args.num_samples, min(len(c[1]) for c in configs))
    times, cpu, finish, decode = ({c[0]: [] for c in configs} for _ in range(4))
    stages = {}  # the decode configuration's stages apart (bench_input.stage_rows), measured once
    for rep in range(3):
        samples._zip_caches.clear()
        loaders = [torch.utils.data.DataLoader(
            ds, batch_size=16, num_workers=args.workers, sampler=[(rep * 7 + i) % len(ds) for i in range(n)],
            collate_fn=augment.Batch.collate if name != 'original' else None)  # the original: tuples, default
            for name, ds, _ in configs]
        spent, batches, encoded = [[0.0, 0.0] for _ in configs], [], []
        for k, batch, wall, cpu_s in _timed_batches(loaders, args.workers):
            spent[k][0] += wall
            spent[k][1] += cpu_s
            if batch is not None and configs[k][2] == 'device_augment':
                batches.append(batch)
            if batch is not None and configs[k][2] == 'jpeg':
                encoded.append((k, batch))
        for (name, _, _), (wall, cpu_s) in zip(configs, spent):
            times[name].append(wall)
            cpu[name].append(cpu_s)
        if batches:  # the device's share, timed apart from the workers'
            torch.set_num_threads(threads)
            t = time.perf_counter()
            for batch in batches:
                augment.finish_views(batch.to(device))
            _sync(device)
            finish['fast+device_augment'].append(time.perf_counter() - t)
            torch.set_num_threads(1)
        if encoded:  # --decode-device: decode and views in this process, in batches of 256 as in bench_gpu.sh
            k = encoded[0][0]
            name, ds = configs[k][0], configs[k][1]
            torch.set_num_threads(threads)
            big = [augment.Batch.cat([b for _, b in encoded[j:j + 16]]) for j in range(0, len(encoded), 16)]
            t = time.perf_counter()
            made = [device_decode.decode_views(b, device, args.decode_device, ds) for b in big]
            _sync(device)
            decode[name].append(time.perf_counter() - t)
            for b in made:
                augment.finish_views(b)
            _sync(device)
            finish[name].append(time.perf_counter() - t)
            if rep == 0:  # each stage apart, and the overlap with a step (bench_input.py)
                stages = bench_input.stage_rows(big, ds, device, args.decode_device)
            torch.set_num_threads(1)
    rows = [{'mode': 'data', 'dataset': args.dataset, 'model': args.model, 'config': name, 'workers': args.workers,
             'num_samples': n, 'samples_per_s': n / statistics.median(times[name]),
             'host_cpu_s_per_sample': statistics.median(cpu[name]) / n,
             'device_ms_per_sample': statistics.median(finish[name]) / n * 1e3 if finish[name] else None,
             'decode_views_ms_per_sample': statistics.median(decode[name]) / n * 1e3 if decode[name] else None,
             'device_ms_per_256': statistics.median(finish[name]) / n * 256e3 if decode[name] else None}
            for name, _, _ in configs]
    for row, (name, ds, _) in zip(rows, configs):
        if decode[name]:
            row.update(stages)
        if name == 'fast' and args.profile:
            row['profile'] = profile_samples(ds, n, args.profile)
        if name == 'fast' and args.stages:
            row['stages_ms'] = stage_times(ds, n)
    torch.set_num_threads(threads)
    return rows


def profile_samples(ds, n, top):
    """cProfile of ``ds[i]`` for i < n in this process: the ``top`` entries by own time, as printed lines."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(n):
        ds[i]
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats('tottime').print_stats(top)
    lines = out.getvalue().splitlines()
    head = next(k for k, line in enumerate(lines) if line.strip().startswith('ncalls'))
    return [line for line in lines[head:] if line.strip()]


def stage_times(ds, n):
    """Milliseconds per sample of each stage of the default host path on samples 0..n-1 of a yfcc15m dataset:
    the same calls as samples.PairMaker.make and views.py's render, one timer each (draws, read, open, decode,
    each view's crop+resize, each colour op, grayscale+blur, flip, to-uint8, tokenize)."""
    from PIL import Image
    maker, total = ds.maker, {}

    def timed(stage, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        total[stage] = total.get(stage, 0.0) + time.perf_counter() - t
        return out

    names = ('brightness', 'contrast', 'saturation', 'hue')
    for i in range(n):
        rng = maker.rng(i)
        record = ds.source.records[i]
        s = f'{int(record[0]):08d}'
        archive = os.path.join(ds.source.root, 'images', s[:2], s[2:5] + '.zip')
        data = timed('read', samples._zip_read, archive, s[5:] + '.jpg')
        img = timed('open', samples.open_image, io.BytesIO(data), archive)
        caption = samples.pick_caption((record[1], record[2]), rng)
        with samples.seeded_rngs(int(rng.integers(2 ** 63))):
            params = timed('draws', lambda size: [t.draw(*size) for _, t in maker.view_transforms], img.size)
        crops = [c for (_, t), p in zip(maker.view_transforms, params) for c in t.crops(p)]
        img, reduced = timed('decode', samples.decode, img, views.draft_scale(crops))
        for (field, t), p in zip(maker.view_transforms, params):
            if field == 'image':
                view = timed('clip_crop_resize', views.resized_crop, img, p, t.size, reduced)
                timed('to_uint8', t.finish, view)
                continue
            view = timed('ssl_crop_resize', views.resized_crop, img, p.crop, t.size, reduced)
            if p.jitter is not None:
                order, *factors = p.jitter  # views.jitter, one timer per step
                x = timed('jitter_to_from_planes', views._float_planes, view)
                for op in order:
                    x = timed(names[op], views.JITTER_STEPS[op], x, factors[op])
                view = timed('jitter_to_from_planes', views._float_image, x, view.size)
            if p.gray or p.sigma is not None:
                stage = 'grayscale+blur' if p.gray and p.sigma is not None else 'grayscale' if p.gray else 'blur'
                view = timed(stage, views.gray_blur, view, p.gray, p.sigma)
            if p.flip:
                view = timed('flip', view.transpose, Image.FLIP_LEFT_RIGHT)
            timed('to_uint8', t.finish, view)
        timed('tokenize', maker.tokenizer, caption)
    return {k: v / n * 1e3 for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


# ----------------------------------------------------------------------------------------------------------------
# Metadata memory
# ----------------------------------------------------------------------------------------------------------------
WORDS = ('sunset beach mountain river city street night light tree flower dog cat bird sky cloud lake road bridge '
         'house garden park snow winter summer autumn spring old new red blue green morning evening family friend '
         'wedding party concert museum church castle train station market festival portrait window door').split()


def private_memory():
    """Private_Clean + Private_Dirty and Private_Dirty of this process, in bytes (/proc/self/smaps_rollup).

    Private_Dirty is memory only this process holds (its own heap, copied-on-write pages). Private_Clean also
    counts file pages (shared libraries, the memory-mapped cache) that no other process happens to map right now:
    page-cache pages, one copy per node, that another process mapping them turns into Shared_Clean."""
    fields = {}
    with open('/proc/self/smaps_rollup') as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == 'kB':
                fields[parts[0].rstrip(':')] = int(parts[1]) * 1024
    return fields['Private_Clean'] + fields['Private_Dirty'], fields['Private_Dirty']


def make_caption_fixture(path, n, seed=0):
    """A yfcc15m.pkl of n (photo_id, title of 6 words, description of 14 words), as make_dataset.py writes it."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS, dtype=object)
    records = []
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        titles, descs = words[rng.integers(len(WORDS), size=(m, 6))], words[rng.integers(len(WORDS), size=(m, 14))]
        records += [(10_000_000 + start + k, ' '.join(titles[k]), ' '.join(descs[k])) for k in range(m)]
    with checkpoints.atomic_write(path) as f:
        pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)


def _read_records(ds, order, seconds):
    """In a forked worker: what __getitem__ does for the caption (record, captions, the sample's choice), without
    the image, for ``seconds``; the private memory gained since the fork every 5 s."""
    import datasets
    start, start_dirty = private_memory()
    samples, k, t0 = [], 0, time.perf_counter()
    deadline, next_sample = t0 + seconds, t0 + 5
    while True:
        i = int(order[k % len(order)])
        record = ds.source.records[i]
        datasets.pick_caption((record[1], record[2]), ds.maker.rng(i))
        k += 1
        now = time.perf_counter()
        if now >= next_sample or now >= deadline:
            total, dirty = private_memory()
            samples.append({'s': round(now - t0, 1), 'private': total - start, 'private_dirty': dirty - start_dirty,
                            'records_read': k})
            next_sample += 5
            if now >= deadline:
                return samples


def metadata_memory_child(impl, root, pkl, cache, seconds, workers=2):
    """In a fresh process: build the yfcc15m dataset (impl 'python': the records as Python lists, as before; else
    compact), then fork ``workers`` workers that read records for ``seconds``; prints one JSON line."""
    import gc
    import datasets
    import metadata
    if impl == 'python':
        metadata.load_metadata = lambda dataset, path, cache_dir=None: metadata.parse_metadata(dataset, path)
    tokenizer = utils.Tokenizer()
    args = argparse.Namespace(dataset='yfcc15m', root=root, metadata=pkl, metadata_cache=cache, model='CLIP_TINY',
                              seed=0, image_format='uint8')
    gc.collect()
    before, before_dirty = private_memory()
    t = time.perf_counter()
    ds = datasets.get_train_dataset(args, tokenizer)
    build_s = time.perf_counter() - t
    gc.collect()
    after, after_dirty = private_memory()
    n = len(ds)
    order = np.random.default_rng(0).permutation(n)  # a sampler's shuffled epoch, made before the fork (shared)
    pipes = []
    for w in range(workers):  # the workers run at the same time, as a DataLoader's do
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            samples = _read_records(ds, order[w::workers], seconds)
            time.sleep(1)  # stay mapped while the others take their last sample: shared pages stay shared
            os.write(write, json.dumps(samples).encode())
            os._exit(0)
        os.close(write)
        pipes.append((pid, read))
    worker = []
    for pid, read in pipes:
        with os.fdopen(read) as f:
            worker.append(json.loads(f.read()))
        os.waitpid(pid, 0)
    print(json.dumps({'impl': impl, 'records': n, 'build_s': build_s, 'private_per_record': (after - before) / n,
                      'private_dirty_per_record': (after_dirty - before_dirty) / n, 'worker': worker}))


def bench_metadata(args):
    import subprocess
    import sys
    os.makedirs(args.root, exist_ok=True)
    cache = args.metadata_cache or os.path.join(args.root, 'metadata_cache')
    if not os.path.exists(args.metadata):
        make_caption_fixture(args.metadata, args.metadata_records, args.seed)
    with open(args.metadata, 'rb') as f:  # the source in the page cache for every configuration alike
        while f.read(1 << 24):
            pass
    rows = []
    for name, impl in (('python_lists', 'python'), ('compact_cold_cache', 'compact'),
                       ('compact_warm_cache', 'compact')):
        if name == 'compact_cold_cache' and os.path.isdir(cache):
            for entry in os.listdir(cache):
                os.unlink(os.path.join(cache, entry))
        code = (f'import bench_data; bench_data.metadata_memory_child({impl!r}, {args.root!r}, {args.metadata!r}, '
                f'{cache if impl == "compact" else None!r}, {args.worker_seconds!r}, {args.forked_workers!r})')
        out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout
        r = json.loads(out.strip().splitlines()[-1])
        last = [trace[-1] for trace in r['worker']]  # each worker's gain at the end
        rows.append({'mode': 'data', 'config': name, 'records': r['records'], 'build_s': r['build_s'],
                     'private_per_record_B': r['private_per_record'],
                     'private_dirty_per_record_B': r['private_dirty_per_record'],
                     'worker_private_gain_MB': max(x['private'] for x in last) / 1e6,
                     'worker_private_dirty_gain_MB': max(x['private_dirty'] for x in last) / 1e6,
                     'worker_s': last[0]['s'], 'worker_records_read': sum(x['records_read'] for x in last),
                     'worker_trace': r['worker']})
    cache_files = [os.path.join(cache, e) for e in os.listdir(cache) if e.endswith('.slipmeta')]
    size = sum(os.path.getsize(p) for p in cache_files)
    for r in rows:
        r['cache_file_B_per_record'] = size / r['records'] if r['config'] != 'python_lists' else None
    return rows
