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
Each configuration prints a table row and one JSON line (`samples_per_s`, `step_s_median`, ...).
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
    p.add_argument('--seed', default=0, type=int)
    return p


# ----------------------------------------------------------------------------------------------------------------
# Training step
# ----------------------------------------------------------------------------------------------------------------
def synthetic_batch(spec, batch_size, device, seed=0) -> augment.Batch:
    """Random views and captions of 8-30 word pieces (typical alt-text lengths), as the family needs them."""
    g = torch.Generator().manual_seed(seed)
    size = spec.image_size
    views = [torch.randn(batch_size, 3, size, size, generator=g) for _ in range(3)]
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
    return batch.to(device)


class TrainStep:
    """One configuration: a model and main.py's training engine over it (same optimizer, same step).

    ``batch_size`` samples per micro-batch and ``update_freq`` micro-batches per optimizer step; ``baseline`` turns
    the model's exact shortcuts off (models.set_fast_paths).
    """

    def __init__(self, args, device, baseline, batch_size=None, update_freq=None, name=None):
        import main
        torch.manual_seed(args.seed)
        self.batch_size = batch_size or args.batch_size
        self.update_freq = update_freq or args.update_freq
        accum = f' {self.update_freq}x{self.batch_size}' if args.compare_accum else ''
        self.name = name or ('baseline' if baseline else 'fast' + ('+compile' if args.compile else '')) + accum
        self.spec = models.get_spec(args.model)
        self.model = models.create_model(args.model).to(device)
        models.set_fast_paths(self.model, not baseline)
        if args.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        train_args = main.get_args_parser().parse_args(['--model', args.model])  # main.py's defaults: lr, wd, ...
        train_args.update_freq, train_args.legacy_update_freq = self.update_freq, args.legacy_update_freq
        train_args.precision, train_args.distributed = args.precision, False
        train_args.compile = args.compile and not baseline
        self.engine = main.build_engine(self.model, train_args, device)
        self.engine.train()
        self.device = device
        data = synthetic_batch(self.spec, self.batch_size * self.update_freq, device, args.seed)
        self.micro_batches = data.chunk(self.update_freq)
        self.times, self.flops, self.peak_rss_gb, self.step_rss_gb = [], None, 0.0, 0.0

    @property
    def samples(self) -> int:
        return self.batch_size * self.update_freq

    def step(self):
        self.engine.step(self.micro_batches)

    def timed_step(self):
        _sync(self.device)
        with _PeakRSS() as rss:
            t = time.perf_counter()
            self.step()
            _sync(self.device)
            self.times.append(time.perf_counter() - t)
        self.peak_rss_gb = max(self.peak_rss_gb, rss.peak_gb)
        self.step_rss_gb = max(self.step_rss_gb, rss.peak_gb - rss.start_gb)  # what the step itself adds

    def count_flops(self):
        from torch.utils.flop_counter import FlopCounterMode
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
    if args.compare_accum:  # K micro-batches of B, exact accumulation, against one batch of K x B
        big = args.batch_size * args.update_freq
        configs = [TrainStep(args, device, args.baseline, args.batch_size, args.update_freq),
                   TrainStep(args, device, args.baseline, big, 1, name=f'batch {big}')]
    elif args.compare:
        configs = [TrainStep(args, device, True), TrainStep(args, device, False)]
    else:
        configs = [TrainStep(args, device, args.baseline)]
    for c in configs:
        if args.count_flops or device.type == 'cuda':
            c.count_flops()  # the FLOPs this configuration really executes (on the uncompiled model)
        for _ in range(args.warmup):
            c.step()  # warm-up (and compilation)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):  # interleaved, so a noisy neighbour hits every configuration alike
        for c in configs:
            c.timed_step()
    peak = _peak_tflops(args, device)
    rows = []
    for c in configs:
        med = statistics.median(c.times)
        row = {'mode': 'train', 'model': args.model, 'config': c.name, 'batch_size': c.batch_size,
               'update_freq': c.update_freq, 'precision': args.precision, 'device': str(device),
               'step_s_median': med, 'samples_per_s': c.samples / med, 'ms_per_sample': med / c.samples * 1e3,
               'gflops_per_step': c.flops / 1e9 if c.flops else None,
               'peak_rss_gb': c.peak_rss_gb, 'step_rss_gb': c.step_rss_gb, 'peak_memory_gb': utils.peak_memory_gb(device),
               'mfu': (c.flops / med / (peak * 1e12)) if peak and c.flops else None}
        rows.append(row)
    return rows


def bench_head(args, device):
    """Memory and time of exact accumulation's once-per-step part: the head (temperature, BatchNorm SSL head) and the
    loss, forward and backward, on N kept tower outputs. Its memory grows with N (head activations) and N^2 (the
    logits), so it, not the micro-batch, bounds the largest global batch; a quadratic fit extrapolates to
    ``--memory-gb``."""
    import losses
    model = models.create_model(args.model).to(device).train()
    spec = models.get_spec(args.model)
    with torch.no_grad(), utils.autocast(args.precision, device):
        shapes = {k: (v.shape[1:], v.dtype) for k, v in model.towers(synthetic_batch(spec, 2, device)).items()}
    criterion = losses.get_loss(args.model)
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


def print_rows(rows):
    keys = [k for k in rows[0] if k not in ('mode',)]
    print(' | '.join(keys))
    for r in rows:
        print(' | '.join(f'{r[k]:.4g}' if isinstance(r[k], float) else str(r[k]) for k in keys))
    if len(rows) >= 2:
        for r in rows[1:]:
            print(f'speed-up of {r["config"]} over {rows[0]["config"]}: '
                  f'{r["samples_per_s"] / rows[0]["samples_per_s"]:.2f}x')
    for r in rows:
        print(json.dumps(r))


def main(args):
    if args.mode == 'data':
        rows = bench_data(args)
    else:
        device = utils.resolve_device(args.device)
        args.precision = args.precision or utils.default_precision(device)
        rows = bench_head(args, device) if args.mode == 'head' else bench_train(args, device)
    print_rows(rows)
    return rows


if __name__ == '__main__':
    main(argparse.ArgumentParser('SLIP benchmarks', parents=[get_args_parser()]).parse_args())
