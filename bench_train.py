"""Benchmarks of the training step (``bench.py train``) and of the head and losses alone (``bench.py head``).

A step is main.py's engine (forward, loss, backward, AdamW) on synthetic inputs (``synthetic_batch``: captions of
8-30 tokens); configurations run interleaved in one process: fast paths vs ``--baseline``, exact accumulation vs
one batch (``--compare-accum``), cheaper SimCLR views against CLIP (``--variants``, ``--clip-reference``). The CLI
and the commands are in bench.py; the input pipeline benchmark is bench_data.py.
"""
import dataclasses
import os
import statistics
import time

import numpy as np
import torch

import augment
import models
import utils

BF16_PEAK_TFLOPS = {'H200': 989.5, 'H100': 989.5, 'A100': 312.0, 'L40S': 362.0, 'A10': 125.0, 'V100': 125.0}


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
                 options=None, shared=None, compile=None):
        """``options``: the view options (VIEW_OPTIONS; default: bench.py's flags); ``shared``: a dict in which
        configurations of one model name share a model and an engine (--variants: only their batches differ);
        ``compile``: torch.compile the fast configuration (default: --compile)."""
        self.compiled = (args.compile if compile is None else compile) and not baseline
        import main
        torch.manual_seed(args.seed)
        self.batch_size = batch_size or args.batch_size
        self.update_freq = update_freq or args.update_freq
        accum = f' {self.update_freq}x{self.batch_size}' if args.compare_accum else ''
        self.name = name or ('baseline' if baseline else 'fast' + ('+compile' if self.compiled else '')) + accum
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
            train_args.compile = self.compiled
            train_args.compile_mode = args.compile_mode
            self.engine = main.build_engine(self.model, train_args, device)
            if shared is not None:
                shared[model_name] = self.model, self.engine
        self.engine.train()
        self.device = device
        data = synthetic_batch(self.spec, self.batch_size * self.update_freq, device, args.seed,
                               **{k: v for k, v in self.options.items() if self.spec.has_ssl or k == 'clip_mask_ratio'})
        if data.text is not None and not baseline:  # cut as main.py's collate does (--text-pad-multiple's default);
            # the baseline is the original's step: every caption at 77 tokens
            multiple = main.get_args_parser().get_default('text_pad_multiple')
            data.text = data.text[:, :augment.text_length(data.text.cpu(), multiple)].contiguous()
        self.micro_batches = data.chunk(self.update_freq)
        self.fast = not baseline
        self.times, self.cpu_times, self.flops, self.peak_rss_gb = [], [], None, 0.0
        self.nominal_flops, self.first_step_s = None, None

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
        self.flops = counter.get_total_flops()
        self.engine.optimizer.zero_grad(set_to_none=True)
        # nominal: what the model is said to cost, every caption at 77 tokens and the full last ViT block
        models.set_fast_paths(self.model, False)
        full = [dataclasses.replace(b, text=torch.nn.functional.pad(b.text, (0, 77 - b.text.shape[1])))
                if b.text is not None else b for b in self.micro_batches]  # the collate's cut undone: 77 tokens
        counter = FlopCounterMode(display=False)
        with counter:
            self.engine.forward_backward(full)
        models.set_fast_paths(self.model, self.fast)
        self.nominal_flops = counter.get_total_flops()
        self.engine.net = net
        self.engine.optimizer.zero_grad(set_to_none=True)

    def first_step(self):
        """The first step, timed: with --compile, mostly the compilation."""
        _sync(self.device)
        t = time.perf_counter()
        self.step()
        _sync(self.device)
        self.first_step_s = time.perf_counter() - t

    def torch_profile(self, rows: int, steps: int = 3):
        """torch.profiler's top ``rows`` operators of ``steps`` steps, by device time on CUDA (else CPU time)."""
        from torch.profiler import ProfilerActivity, profile
        cuda = self.device.type == 'cuda'
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                self.step()
            _sync(self.device)
        key = 'self_cuda_time_total' if cuda else 'self_cpu_time_total'
        return prof.key_averages().table(sort_by=key, row_limit=rows).splitlines()


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
    elif args.compare_compile:  # the fast step eager and compiled, interleaved
        configs = [TrainStep(args, device, False, compile=False), TrainStep(args, device, False, compile=True)]
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
        c.first_step()  # compilation, with --compile
        for _ in range(args.warmup - 1):
            c.step()  # warm-up
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
               'mfu': (c.flops / med / (peak * 1e12)) if peak and c.flops else None,
               'nominal_gflops_per_step': c.nominal_flops / 1e9 if c.nominal_flops else None,
               'mfu_nominal': (c.nominal_flops / med / (peak * 1e12)) if peak and c.nominal_flops else None,
               'first_step_s': c.first_step_s, 'compiled': c.compiled,
               'compile_mode': args.compile_mode if c.compiled else None}
        if args.torch_profile:
            row['torch_profile'] = c.torch_profile(args.torch_profile)
        if c.engine.compile_s is not None:
            row['compile_s'] = c.engine.compile_s  # the first compiled step (a warm-up step), its run included
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


def bench_attention(args, device):
    """One block's attention of ``--model``'s ViT (``--batch-size`` images of 224 px: 197 tokens), forward and
    backward under the run's autocast: timm's heads' layout (permuted, then unbound) against ``SplitHeadsAttention``
    (unbound in the projection's layout: one full copy of the q/k/v gradient fewer), interleaved."""
    from towers import SplitHeadsAttention, TimmAttention
    visual = models.create_model(args.model).visual.to(device)
    attn = visual.blocks[0].attn
    tokens = visual.patch_embed.num_patches + getattr(visual, 'num_prefix_tokens', 1)
    x = torch.randn(args.batch_size, tokens, visual.embed_dim, device=device, requires_grad=True)
    layouts = {'timm': TimmAttention, 'split_heads': SplitHeadsAttention}
    times = {name: [] for name in layouts}

    def run(cls):
        attn.__class__ = cls
        with utils.autocast(args.precision, device):
            y = attn(x)
        y.backward(torch.ones_like(y))
        x.grad = None
        attn.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        for cls in layouts.values():
            run(cls)
    for _ in range(args.steps):
        for name, cls in layouts.items():
            _sync(device)
            t = time.perf_counter()
            run(cls)
            _sync(device)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times['timm'])
    return [{'mode': 'attention', 'model': models.get_spec(args.model).name, 'layout': name,
             'batch_size': args.batch_size, 'tokens': tokens, 'precision': args.precision, 'device': str(device),
             'fwd_bwd_ms_median': statistics.median(t) * 1e3, 'time_vs_timm': statistics.median(t) / base}
            for name, t in times.items()]

