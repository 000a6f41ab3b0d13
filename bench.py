"""Benchmarks: one training step, and the input pipeline alone. Fast paths vs the original's computation.

Training step (main.py's engine: forward, loss, backward, AdamW) on synthetic inputs, captions of 8-30 tokens:
    python bench.py train --model SLIP_VITS16 --batch-size 8 --precision amp_bf16 --device cpu --steps 5 --compare
Exact accumulation (4 micro-batches of 8) against one batch of 32, time per sample and peak memory of each:
    python bench.py train --model SLIP_VITS16 --batch-size 8 --update-freq 4 --compare-accum --precision fp32
Input pipeline (read, decode, all views, tokenize) in one process, on YFCC-layout zips made here if missing:
    python bench.py data --dataset yfcc15m --root /tmp/yfcc_bench --metadata /tmp/yfcc_bench/yfcc.pkl \
        --model SLIP_VITS16 --workers 0 --num-samples 300 --make-fixture --compare

`--baseline` turns the model's fast paths off (separate view passes, full 77-token text, a full last ViT block,
unfused attention; in `data`, a zip archive reopened per sample and float views made in the worker); `--compare` runs
both in one process, interleaved, and prints the ratio. `data --device-augment` adds main.py's --device-augment.
Cheaper SimCLR views (main.py's --ssl-view-size / --ssl-mask-ratio / --clip-mask-ratio), several in one process,
interleaved, against CLIP at the same size (step time and FLOPs as ratios to it):
    python bench.py train --model SLIP_VITS16 --batch-size 8 --precision fp32 --device cpu --steps 3 --warmup 1 \
        --count-flops --clip-reference --variants 'default;ssl-view-size=112;ssl-mask-ratio=0.5'
Each configuration prints a table row and one JSON line (`samples_per_s`, `step_s_median`, ...).

Metadata memory (Python lists as before vs compact arrays memory-mapped from the cache, each in a fresh process):
    python bench.py data --metadata-memory --root /tmp/meta_bench --metadata /tmp/meta_bench/yfcc15m.pkl \
        --metadata-records 1000000 --worker-seconds 25
prints the private memory that building the dataset adds per record, the build time, and the private memory that an
os.fork()ed worker gains while it looks up records and picks their captions as `__getitem__` does (no images).
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
import models
import utils

BF16_PEAK_TFLOPS = {'H200': 989.5, 'H100': 989.5, 'A100': 312.0, 'L40S': 362.0, 'A10': 125.0, 'V100': 125.0}


def get_args_parser():
    p = argparse.ArgumentParser('SLIP benchmarks', add_help=False)
    p.add_argument('mode', choices=['train', 'head', 'data'])
    p.add_argument('--model', default='SLIP_VITB16')
    p.add_argument('--batch-size', default=8, type=int)
    p.add_argument('--precision', default=None, choices=utils.PRECISIONS, help='default: the device\'s default')
    p.add_argument('--device', default=None)
    p.add_argument('--steps', default=5, type=int, help='timed steps per configuration')
    p.add_argument('--warmup', default=2, type=int, help='untimed steps first (compilation, allocator warm-up)')
    p.add_argument('--count-flops', action='store_true', help='count FLOPs per step (always on CUDA, for MFU)')
    p.add_argument('--baseline', action='store_true', help='every fast path off')
    p.add_argument('--compare', action='store_true', help='baseline and fast paths side by side, interleaved')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (fast configuration)')
    p.add_argument('--update-freq', default=1, type=int, help='micro-batches per optimizer step (main.py\'s flag)')
    p.add_argument('--legacy-update-freq', action='store_true', help='the original\'s per-micro-batch accumulation')
    p.add_argument('--compare-accum', action='store_true',
                   help='--update-freq K micro-batches of --batch-size B against one batch of K x B, interleaved')
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--peak-tflops', default=None, type=float, help='bf16 peak for MFU (default: by GPU name)')
    p.add_argument('--head-batches', default='512,1024,2048', help='head mode: accumulated batch sizes to measure')
    p.add_argument('--memory-gb', default=139.0, type=float,
                   help='head mode: device memory to fit the head and loss step into (default: one H200)')
    p.add_argument('--dataset', default='yfcc15m')
    p.add_argument('--root', default='/tmp/yfcc_bench')
    p.add_argument('--metadata', default='/tmp/yfcc_bench/yfcc.pkl')
    p.add_argument('--workers', default=0, type=int)
    p.add_argument('--num-samples', default=200, type=int)
    p.add_argument('--make-fixture', action='store_true', help='write YFCC-layout zips of 500x375 JPEGs if absent')
    p.add_argument('--fixture-archive-size', default=1000, type=int, help='photos per zip (YFCC: 1000)')
    p.add_argument('--device-augment', action='store_true',
                   help='data mode: also measure main.py --device-augment (SimCLR colour/blur on --device)')
    p.add_argument('--metadata-memory', action='store_true',
                   help='data mode: memory and build time of the metadata alone, Python lists vs compact arrays with '
                        'a cold and a warm cache, on a generated yfcc15m.pkl (--metadata)')
    p.add_argument('--metadata-records', default=1_000_000, type=int, help='records of the generated yfcc15m.pkl')
    p.add_argument('--worker-seconds', default=25.0, type=float, help='how long a forked worker reads records')
    p.add_argument('--forked-workers', default=2, type=int, help='workers reading records at the same time')
    p.add_argument('--metadata-cache', default=None, help='cache folder (default: <root>/metadata_cache)')
    p.add_argument('--ssl-view-size', default=None, type=int, help='main.py\'s flag (default: the model\'s size)')
    p.add_argument('--ssl-mask-ratio', default=0.0, type=float, help='main.py\'s flag')
    p.add_argument('--clip-mask-ratio', default=0.0, type=float, help='main.py\'s flag')
    p.add_argument('--variants', default=None,
                   help="train: several view options in one process, interleaved, ';'-separated, each 'default' or "
                        "comma-separated flag=value, e.g. 'default;ssl-view-size=112;ssl-mask-ratio=0.5,"
                        "ssl-view-size=160' (one model and engine shared by all)")
    p.add_argument('--clip-reference', action='store_true',
                   help='train: also time the CLIP model of the same size (SLIP_X -> CLIP_X) and print every row\'s '
                        'step time and FLOPs as ratios to it')
    p.add_argument('--seed', default=0, type=int)
    return p


# ----------------------------------------------------------------------------------------------------------------
# Training step
# ----------------------------------------------------------------------------------------------------------------
VIEW_OPTIONS = ('ssl_view_size', 'ssl_mask_ratio', 'clip_mask_ratio')


def synthetic_batch(spec, batch_size, device, seed=0, ssl_view_size=None, ssl_mask_ratio=0.0,
                    clip_mask_ratio=0.0) -> augment.Batch:
    """Random views and captions of 8-30 word pieces (typical alt-text lengths), as the family needs them; the
    SimCLR views at ``ssl_view_size`` px, and random kept patch indices (from the seeded generator) for the masked
    views, as main.py's workers would draw them."""
    g = torch.Generator().manual_seed(seed)
    size, ssl_size = spec.image_size, ssl_view_size or spec.image_size
    views = [torch.randn(batch_size, 3, size, size, generator=g) for _ in range(3)]
    views[1:] = [v[:, :, :ssl_size, :ssl_size].contiguous() for v in views[1:]]  # the same captions at any size
    text = torch.zeros(batch_size, 77, dtype=torch.long)
    for i in range(batch_size):  # start, 8-30 word-piece ids, end
        n = int(torch.randint(8, 31, (1,), generator=g))
        text[i, 0], text[i, n + 1] = 49406, 49407
        text[i, 1:n + 1] = torch.randint(300, 40000, (n,), generator=g)
    batch = augment.Batch(n_bad=torch.zeros(batch_size, dtype=torch.int64))
    if spec.has_text:
        batch.image, batch.text = views[0], text
    if spec.has_ssl:
        batch.aug1, batch.aug2 = views[1], views[2]

    def keeps(view_size, ratio):
        n = (view_size // spec.patch_size) ** 2
        return torch.stack([augment.draw_keep(n, augment.keep_count(n, ratio), g) for _ in range(batch_size)])

    if spec.has_ssl and ssl_mask_ratio:
        batch.aug1_keep, batch.aug2_keep = keeps(ssl_size, ssl_mask_ratio), keeps(ssl_size, ssl_mask_ratio)
    if spec.has_text and clip_mask_ratio:
        batch.image_keep = keeps(size, clip_mask_ratio)
    return batch.to(device)


def parse_variants(text):
    """'default;ssl-view-size=112;ssl-mask-ratio=0.5,ssl-view-size=160' -> [(name, {option: value})]."""
    out = []
    for item in filter(None, (v.strip() for v in text.split(';'))):
        options = {}
        for part in filter(None, (p.strip() for p in ('' if item == 'default' else item).split(','))):
            key, _, value = part.partition('=')
            key = key.strip().lstrip('-').replace('-', '_')
            if key not in VIEW_OPTIONS or not value:
                raise ValueError(f'--variants: {part!r} is not flag=value with a flag among '
                                 f'{", ".join(o.replace("_", "-") for o in VIEW_OPTIONS)}')
            options[key] = int(value) if key == 'ssl_view_size' else float(value)
        out.append((item, options))
    return out


class TrainStep:
    """One configuration: a model and main.py's training engine over it (same optimizer, same step).

    ``batch_size`` samples per micro-batch and ``update_freq`` micro-batches per optimizer step; ``baseline`` turns
    the model's exact shortcuts off (models.set_fast_paths).
    """

    def __init__(self, args, device, baseline, batch_size=None, update_freq=None, name=None, model_name=None,
                 options=None, shared=None):
        """``options``: the view options (VIEW_OPTIONS; default: bench.py's flags); ``shared``: a dict in which
        configurations of one model name share a model and an engine (--variants: only their batches differ)."""
        import main
        torch.manual_seed(args.seed)
        self.batch_size = batch_size or args.batch_size
        self.update_freq = update_freq or args.update_freq
        accum = f' {self.update_freq}x{self.batch_size}' if args.compare_accum else ''
        self.name = name or ('baseline' if baseline else 'fast' + ('+compile' if args.compile else '')) + accum
        model_name = model_name or args.model
        self.spec = models.get_spec(model_name)
        self.options = {k: getattr(args, k) for k in VIEW_OPTIONS} if options is None else dict(options)
        self.dynamic = (self.options.get('ssl_view_size') or self.spec.image_size) != self.spec.image_size
        if shared is not None and model_name in shared:
            self.model, self.engine = shared[model_name]
        else:
            self.model = models.create_model(model_name).to(device)
            models.set_fast_paths(self.model, not baseline)
            if args.grad_checkpointing:
                self.model.set_grad_checkpointing(True)
            train_args = main.get_args_parser().parse_args(['--model', model_name])  # main.py's defaults: lr, wd...
            train_args.update_freq, train_args.legacy_update_freq = self.update_freq, args.legacy_update_freq
            train_args.precision, train_args.distributed = args.precision, False
            train_args.compile = args.compile and not baseline
            self.engine = main.build_engine(self.model, train_args, device)
            if shared is not None:
                shared[model_name] = self.model, self.engine
        self.engine.train()
        self.device = device
        data = synthetic_batch(self.spec, self.batch_size * self.update_freq, device, args.seed,
                               **{k: v for k, v in self.options.items() if self.spec.has_ssl or k == 'clip_mask_ratio'})
        self.micro_batches = data.chunk(self.update_freq)
        self.times, self.cpu_times, self.flops, self.peak_rss_gb = [], [], None, 0.0

    @property
    def samples(self) -> int:
        return self.batch_size * self.update_freq

    def _set_size_mode(self):
        """A shared model takes smaller SimCLR views only in the configurations that have them (main.py's rule)."""
        if self.spec.patch_size is not None and getattr(self.model.visual, 'dynamic_img_size', False) != self.dynamic:
            models.set_dynamic_img_size(self.model.visual, self.dynamic)

    def step(self):
        self._set_size_mode()
        self.engine.step(self.micro_batches)

    def timed_step(self):
        _sync(self.device)
        with _PeakRSS() as rss:
            t, cpu = time.perf_counter(), time.process_time()
            self.step()
            _sync(self.device)
            self.times.append(time.perf_counter() - t)
            self.cpu_times.append(time.process_time() - cpu)  # CPU seconds of this process: steadier on a shared host
        self.peak_rss_gb = max(self.peak_rss_gb, rss.peak_gb)

    def count_flops(self):
        from torch.utils.flop_counter import FlopCounterMode
        self._set_size_mode()
        net, self.engine.net = self.engine.net, self.engine.eager  # count the FLOPs of the uncompiled step
        counter = FlopCounterMode(display=False)
        with counter:
            self.engine.forward_backward(self.micro_batches)
        self.engine.net = net
        self.engine.optimizer.zero_grad(set_to_none=True)
        self.flops = counter.get_total_flops()


class _PeakRSS:
    """The process's peak resident memory while the block runs (polled every 2 ms from /proc; 0 elsewhere), and
    what it was at the start."""

    def __enter__(self):
        import threading
        self.peak_gb, self._stop = 0.0, threading.Event()
        self.start_gb = self._read()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _read() -> float:
        try:
            with open('/proc/self/statm') as f:
                return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 30
        except (OSError, ValueError, AttributeError):
            return 0.0

    def _poll(self):
        while True:
            self.peak_gb = max(self.peak_gb, self._read())
            if self._stop.wait(0.002):
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _peak_tflops(args, device):
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def bench_train(args, device):
    if args.compare_accum:  # K micro-batches of B, exact accumulation, against one batch of K x B and the legacy
        big, k, b = args.batch_size * args.update_freq, args.update_freq, args.batch_size
        args.legacy_update_freq = False
        configs = [TrainStep(args, device, args.baseline, b, k, name=f'exact {k}x{b}'),
                   TrainStep(args, device, args.baseline, big, 1, name=f'batch {big}')]
        args.legacy_update_freq = True  # same micro-batches, one forward each: isolates the extra forward's cost
        configs.append(TrainStep(args, device, args.baseline, b, k, name=f'legacy {k}x{b}'))
        args.legacy_update_freq = False
    elif args.compare:
        configs = [TrainStep(args, device, True), TrainStep(args, device, False)]
    elif args.variants:  # view options, all on one shared model and engine
        shared = {}
        configs = [TrainStep(args, device, args.baseline, name=name, options=opt, shared=shared)
                   for name, opt in parse_variants(args.variants)]
    else:
        configs = [TrainStep(args, device, args.baseline)]
    if args.clip_reference:
        clip_name = models.get_spec(args.model).name.replace('SLIP_', 'CLIP_').replace('SIMCLR_', 'CLIP_')
        configs.insert(0, TrainStep(args, device, args.baseline, name=f'{clip_name} (reference)',
                                    model_name=clip_name, options={}))
    for c in configs:
        if args.count_flops or device.type == 'cuda':
            c.count_flops()  # the FLOPs this configuration really executes (on the uncompiled model)
        for _ in range(args.warmup):
            c.step()  # warm-up (and compilation)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    static_gb = _PeakRSS._read()  # every configuration's model and optimizer state exist: a step adds to this
    for _ in range(args.steps):  # interleaved, so a noisy neighbour hits every configuration alike
        for c in configs:
            c.timed_step()
    peak = _peak_tflops(args, device)
    rows = []
    for c in configs:
        med = statistics.median(c.times)
        row = {'mode': 'train', 'model': c.spec.name, 'config': c.name, 'batch_size': c.batch_size,
               'update_freq': c.update_freq, 'precision': args.precision, 'device': str(device),
               'step_s_median': med, 'cpu_s_median': statistics.median(c.cpu_times),
               'samples_per_s': c.samples / med, 'ms_per_sample': med / c.samples * 1e3,
               'gflops_per_step': c.flops / 1e9 if c.flops else None,
               'peak_rss_gb': c.peak_rss_gb, 'step_rss_gb': c.peak_rss_gb - static_gb,
               'peak_memory_gb': utils.peak_memory_gb(device),
               'mfu': (c.flops / med / (peak * 1e12)) if peak and c.flops else None}
        if args.clip_reference:  # configs[0] is CLIP at the same size
            ref = configs[0]
            row['time_vs_clip'] = med / statistics.median(ref.times)
            row['cpu_time_vs_clip'] = row['cpu_s_median'] / statistics.median(ref.cpu_times)
            row['flops_vs_clip'] = c.flops / ref.flops if c.flops and ref.flops else None
        rows.append(row)
    return rows


def bench_head(args, device):
    """Memory and time of exact accumulation's once-per-step part: the head (temperature, BatchNorm SSL head) and the
    loss, forward and backward, on N kept tower outputs. Its memory grows with N (head activations) and N^2 (the
    logits), so it, not the micro-batch, bounds the largest global batch; a quadratic fit extrapolates to
    ``--memory-gb``."""
    model = models.create_model(args.model).to(device).train()
    spec = models.get_spec(args.model)
    with torch.no_grad(), utils.autocast(args.precision, device):
        shapes = {k: (v.shape[1:], v.dtype) for k, v in model.towers(synthetic_batch(spec, 2, device)).items()}
    criterion = models.get_loss(args.model)
    rows = []
    for n in [int(x) for x in args.head_batches.split(',')]:
        g = torch.Generator(device=device).manual_seed(n)
        kept = {k: torch.randn(n, *s, generator=g, device=device).to(dt).requires_grad_() for k, (s, dt) in
                shapes.items()}
        _sync(device)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with _PeakRSS() as rss:
            t = time.perf_counter()
            with utils.autocast(args.precision, device):
                loss = criterion(model.head(kept))['loss']
            loss.backward()
            _sync(device)
            seconds = time.perf_counter() - t
        used = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 30 if device.type == 'cuda' else \
            rss.peak_gb - rss.start_gb
        model.zero_grad(set_to_none=True)
        del kept, loss
        rows.append({'mode': 'head', 'model': args.model, 'config': f'N={n}', 'batch_size': n,
                     'precision': args.precision, 'device': str(device), 'step_s_median': seconds,
                     'samples_per_s': n / seconds, 'head_memory_gb': used})
    if len(rows) >= 3:  # memory = a + b N + c N^2, through the measured points
        ns = np.array([r['batch_size'] for r in rows], dtype=np.float64)
        c, b, a = np.polyfit(ns, [r['head_memory_gb'] for r in rows], 2)
        roots = np.roots([c, b, a - args.memory_gb])
        fit = max((float(r.real) for r in roots if abs(r.imag) < 1e-9 and r.real > 0), default=float('nan'))
        print(f'head+loss memory ~ {a:.3g} + {b * 1e3:.3g}e-3 N + {c * 1e6:.3g}e-6 N^2 GB; '
              f'{args.memory_gb:g} GB holds N ~ {fit:.0f}')
        for r in rows:
            r['largest_batch_for_memory_gb'] = fit
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Input pipeline
# ----------------------------------------------------------------------------------------------------------------
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
    timed apart (``device_ms_per_sample``)."""
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
    sets = {}
    for name, _, fmt in configs:
        args.image_format = fmt
        sets[name] = datasets.get_train_dataset(args, utils.Tokenizer())
        sets[name].set_epoch(0)
    device = utils.resolve_device(args.device) if args.device_augment else None
    n = min(args.num_samples, len(sets[configs[0][0]]))
    times = {c[0]: [] for c in configs}
    finish = {c[0]: [] for c in configs}
    for rep in range(3):  # interleave repetitions of each configuration
        for name, keep_open, fmt in configs:
            datasets.ZIP_KEEP_OPEN = keep_open
            datasets._zip_caches.clear()
            loader = torch.utils.data.DataLoader(sets[name], batch_size=16, num_workers=args.workers,
                                                 collate_fn=augment.Batch.collate,
                                                 sampler=[(rep * 7 + i) % len(sets[name]) for i in range(n)])
            t, batches = time.perf_counter(), []
            for batch in loader:
                if fmt == 'device_augment':
                    batches.append(batch)
            times[name].append(time.perf_counter() - t)
            if batches:  # the device's share, timed apart from the workers'
                torch.set_num_threads(threads)
                t = time.perf_counter()
                for batch in batches:
                    augment.finish_views(batch.to(device))
                _sync(device)
                finish[name].append(time.perf_counter() - t)
                torch.set_num_threads(1)
    datasets.ZIP_KEEP_OPEN = True
    torch.set_num_threads(threads)
    return [{'mode': 'data', 'dataset': args.dataset, 'model': args.model, 'config': name, 'workers': args.workers,
             'num_samples': n, 'samples_per_s': n / statistics.median(times[name]),
             'device_ms_per_sample': statistics.median(finish[name]) / n * 1e3 if finish[name] else None}
            for name, _, _ in configs]


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
        code = (f'import bench; bench.metadata_memory_child({impl!r}, {args.root!r}, {args.metadata!r}, '
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


def print_rows(rows):
    keys = [k for k in rows[0] if k not in ('mode', 'worker_trace')]
    print(' | '.join(keys))
    for r in rows:
        print(' | '.join(f'{r[k]:.4g}' if isinstance(r[k], float) else str(r[k]) for k in keys))
    if len(rows) >= 2 and 'samples_per_s' in rows[0]:
        for r in rows[1:]:
            print(f'speed-up of {r["config"]} over {rows[0]["config"]}: '
                  f'{r["samples_per_s"] / rows[0]["samples_per_s"]:.2f}x')
    for r in rows:
        print(json.dumps(r))


def main(args):
    if args.mode == 'data' and args.metadata_memory:
        rows = bench_metadata(args)
    elif args.mode == 'data':
        rows = bench_data(args)
    else:
        device = utils.resolve_device(args.device)
        args.precision = args.precision or utils.default_precision(device)
        rows = bench_head(args, device) if args.mode == 'head' else bench_train(args, device)
    print_rows(rows)
    return rows


if __name__ == '__main__':
    main(argparse.ArgumentParser('SLIP benchmarks', parents=[get_args_parser()]).parse_args())
