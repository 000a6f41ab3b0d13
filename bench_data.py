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
import statistics
import time

import numpy as np
import torch

import augment
import samples
import utils
from bench_train import _sync


def make_yfcc_fixture(root, metadata, n, seed=0, per_zip=1000):
    """YFCC layout (images/<2>/<3>.zip holding <3>.jpg) with n photos of 500x375, per_zip members per archive."""
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
                img = Image.fromarray(base).resize((500, 375), Image.BICUBIC)  # smooth, JPEG-like content
                buf = io.BytesIO()
                img.save(buf, format='JPEG', quality=90)
                zf.writestr(f'{j:03d}.jpg', buf.getvalue())
                records.append((photo_id, f'photo number {photo_id} of a landscape', f'description {photo_id}'))
    with open(metadata, 'wb') as f:
        pickle.dump(records[:n] if n >= per_zip else records, f)


def bench_data(args):
    """The input pipeline alone: read, decode, every view, tokenize, collate. Configurations (interleaved):
    baseline (zip reopened per sample, float views made in the worker), fast (what main.py runs: zips kept open,
    uint8 views) and, with --device-augment, fast+device_augment, whose batched colour/blur cost on --device is
    timed apart (``device_ms_per_sample``); with --decode-device, decode=cpu|cuda (main.py's --decode-device: the
    workers send bytes; the decode and views on --device timed apart in batches of 256, ``device_ms_per_256``,
    and the decode, crop and resize alone, ``decode_views_ms_per_sample``).
    ``host_cpu_ms_per_sample``: CPU time of the loading process and its workers per sample (the decode apart)."""
    import datasets
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker: tiny tensor ops must not wait on a thread pool
    if args.make_fixture and not os.path.exists(args.metadata):
        make_yfcc_fixture(args.root, args.metadata, args.num_samples, args.seed, args.fixture_archive_size)
    args.demo_samples, args.train_num_samples = args.num_samples, args.num_samples
    configs = [('baseline', False, 'float'), ('fast', True, 'uint8')] if args.compare else \
        [('baseline', False, 'float') if args.baseline else ('fast', True, 'uint8')]
    if args.device_augment:
        configs.append(('fast+device_augment', True, 'device_augment'))
    if getattr(args, 'decode_device', None):  # --decode-device: the workers send bytes; decode and views timed apart
        configs.append((f'decode={args.decode_device}', True, 'jpeg'))
    sets = {}
    for name, _, fmt in configs:
        args.image_format = fmt
        sets[name] = datasets.get_train_dataset(args, utils.Tokenizer())
        sets[name].set_epoch(0)
    timed_apart = args.device_augment or getattr(args, 'decode_device', None)
    device = utils.resolve_device(args.device) if timed_apart else None
    n = min(args.num_samples, len(sets[configs[0][0]]))
    times = {c[0]: [] for c in configs}
    finish = {c[0]: [] for c in configs}
    host_cpu = {c[0]: [] for c in configs}  # CPU seconds of this process and its (finished) workers
    decode = {c[0]: [] for c in configs}  # --decode-device: decode, crop and resize (finish: and the colour ops)
    for rep in range(3):  # interleave repetitions of each configuration
        for name, keep_open, fmt in configs:
            samples.ZIP_KEEP_OPEN = keep_open
            samples._zip_caches.clear()
            loader = torch.utils.data.DataLoader(sets[name], batch_size=16, num_workers=args.workers,
                                                 collate_fn=augment.Batch.collate,
                                                 sampler=[(rep * 7 + i) % len(sets[name]) for i in range(n)])
            t, cpu, batches = time.perf_counter(), _host_cpu_s(), []
            for batch in loader:
                if fmt in ('device_augment', 'jpeg'):
                    batches.append(batch)
            times[name].append(time.perf_counter() - t)
            host_cpu[name].append(_host_cpu_s() - cpu)  # the workers have exited and been reaped: counted
            if fmt == 'jpeg':  # --decode-device: decode and views in this process, in batches of 256 as bench_gpu.sh's
                import device_decode
                torch.set_num_threads(threads)
                big = [augment.Batch.cat(batches[k:k + 16]) for k in range(0, len(batches), 16)]
                t = time.perf_counter()
                views = [device_decode.decode_views(batch, device, args.decode_device, sets[name]) for batch in big]
                _sync(device)
                decode[name].append(time.perf_counter() - t)
                for batch in views:
                    augment.finish_views(batch)
                _sync(device)
                finish[name].append(time.perf_counter() - t)
                torch.set_num_threads(1)
                batches = []
            if batches:  # the device's share, timed apart from the workers'
                torch.set_num_threads(threads)
                t = time.perf_counter()
                for batch in batches:
                    augment.finish_views(batch.to(device))
                _sync(device)
                finish[name].append(time.perf_counter() - t)
                torch.set_num_threads(1)
    samples.ZIP_KEEP_OPEN = True
    torch.set_num_threads(threads)
    return [{'mode': 'data', 'dataset': args.dataset, 'model': args.model, 'config': name, 'workers': args.workers,
             'num_samples': n, 'samples_per_s': n / statistics.median(times[name]),
             'device_ms_per_sample': statistics.median(finish[name]) / n * 1e3 if finish[name] else None,
             'host_cpu_ms_per_sample': statistics.median(host_cpu[name]) / n * 1e3,
             'device_ms_per_256': statistics.median(finish[name]) / n * 256e3 if fmt == 'jpeg' else None,
             'decode_views_ms_per_sample': statistics.median(decode[name]) / n * 1e3 if fmt == 'jpeg' else None}
            for name, _, fmt in configs]


def _host_cpu_s() -> float:
    """User + system CPU seconds of this process and of its children that have exited (DataLoader workers)."""
    import resource
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


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
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


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
