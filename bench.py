"""Benchmarks: one training step, and the input pipeline alone. Fast paths vs the original's computation.

The command line; the training-step and head benchmarks are in bench_train.py, the input pipeline and metadata
memory in bench_data.py (their names are re-exported here).

Training step (main.py's engine: forward, loss, backward, AdamW) on synthetic inputs, captions of 8-30 tokens:
    python bench.py train --model SLIP_VITS16 --batch-size 8 --precision amp_bf16 --device cpu --steps 5 --compare
Exact accumulation (4 micro-batches of 8) against one batch of 32, time per sample and peak memory of each:
    python bench.py train --model SLIP_VITS16 --batch-size 8 --update-freq 4 --compare-accum --precision fp32
Input pipeline (read, decode, all views, tokenize) in one process, on YFCC-layout zips made here if missing, with
host CPU seconds per sample, the fast path's time per stage and its cProfile (top 15):
    python bench.py data --dataset yfcc15m --root /tmp/yfcc_bench --metadata /tmp/yfcc_bench/yfcc.pkl \
        --model SLIP_VITS16 --workers 0 --num-samples 300 --make-fixture --compare --stages --profile 15

`--baseline` turns the model's fast paths off (separate view passes, full 77-token text, a full last ViT block,
unfused attention); in `data` it runs the original SLIP's dataset code (bench_original.py: a zip archive reopened per
sample, torchvision's transforms, float views made in the worker, OpenAI's tokenizer, tuples). `--compare` runs both
in one process, interleaved, and prints the ratio. `data --device-augment` adds main.py's --device-augment,
`data --decode-device cpu|cuda` main.py's --decode-device (the workers' share, then decode and views apart; and each
stage in ms per 256 samples: decode, crops batched and one by one, colour/blur, and on CUDA the share hidden behind a
step: bench_input.py, which also holds the GPU probes of the pixels per JPEG kind and of the decoder's race).
Cheaper SimCLR views (main.py's --ssl-view-size / --ssl-mask-ratio / --clip-mask-ratio), several in one process,
interleaved, against CLIP at the same size (step time and FLOPs as ratios to it):
    python bench.py train --model SLIP_VITS16 --batch-size 8 --precision fp32 --device cpu --steps 3 --warmup 1 \
        --count-flops --clip-reference --variants 'default;ssl-view-size=112;ssl-mask-ratio=0.5'
Each configuration prints a table row and one JSON line (`samples_per_s`, `step_s_median`, ...).
One ViT block's attention, forward and backward, timm's heads' layout against SplitHeadsAttention's, interleaved:
    python bench.py attention --model SLIP_VITB16 --batch-size 32 --precision fp32 --device cpu --steps 9

Metadata memory (Python lists as before vs compact arrays memory-mapped from the cache, each in a fresh process):
    python bench.py data --metadata-memory --root /tmp/meta_bench --metadata /tmp/meta_bench/yfcc15m.pkl \
        --metadata-records 1000000 --worker-seconds 25
prints the private memory that building the dataset adds per record, the build time, and the private memory that an
os.fork()ed worker gains while it looks up records and picks their captions as `__getitem__` does (no images).
"""
import argparse
import json

import utils
from bench_data import bench_data, bench_metadata, make_caption_fixture, make_yfcc_fixture  # noqa: F401
from bench_train import (VIEW_OPTIONS, TrainStep, bench_attention, bench_head, bench_train,  # noqa: F401
                         parse_variants, synthetic_batch)


def get_args_parser():
    p = argparse.ArgumentParser('SLIP benchmarks', add_help=False)
    p.add_argument('mode', choices=['train', 'head', 'data', 'attention'])
    p.add_argument('--model', default='SLIP_VITB16')
    p.add_argument('--batch-size', default=8, type=int)
    p.add_argument('--precision', default=None, choices=utils.PRECISIONS, help='default: the device\'s default')
    p.add_argument('--device', default=None)
    p.add_argument('--steps', default=5, type=int, help='timed steps per configuration')
    p.add_argument('--warmup', default=2, type=int,
                   help='untimed steps first (compilation, allocator warm-up); the first is timed apart (first_step_s)')
    p.add_argument('--count-flops', action='store_true', help='count FLOPs per step (always on CUDA, for MFU)')
    p.add_argument('--baseline', action='store_true', help='every fast path off')
    p.add_argument('--compare', action='store_true', help='baseline and fast paths side by side, interleaved')
    p.add_argument('--compile', action='store_true', help='torch.compile the model (fast configuration)')
    p.add_argument('--compare-compile', action='store_true',
                   help='the fast step eager and compiled (--compile-mode), interleaved in one process')
    p.add_argument('--compile-mode', default='default', help='main.py\'s --compile-mode (reduce-overhead: CUDA graphs)')
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
    p.add_argument('--fixture-size', default='500x375', help='WxH of the photos --make-fixture writes (larger ones, '
                   'as in CC12M or RedCaps, are decoded at a reduced DCT scale where the crops allow)')
    p.add_argument('--torch-profile', default=0, type=int, metavar='N',
                   help='train mode: torch.profiler\'s top N operators of 3 more steps of each configuration')
    p.add_argument('--profile', default=0, type=int, metavar='N',
                   help='data mode: also a cProfile of the fast path over the samples (top N by own time)')
    p.add_argument('--stages', action='store_true', help='data mode: also the fast path\'s time per stage')
    p.add_argument('--device-augment', action='store_true',
                   help='data mode: also measure main.py --device-augment (SimCLR colour/blur on --device)')
    p.add_argument('--decode-device', default=None, choices=['cpu', 'cuda'],
                   help='data mode: also measure main.py --decode-device (workers send JPEG bytes; decode and views '
                        'batched on this device, timed apart per batch of 256)')
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


def print_rows(rows):
    extra = ('mode', 'worker_trace', 'profile', 'stages_ms', 'torch_profile')  # printed apart
    keys = [k for k in rows[0] if k not in extra]
    print(' | '.join(keys))
    for r in rows:
        print(' | '.join(f'{r[k]:.4g}' if isinstance(r[k], float) else str(r[k]) for k in keys))
    if len(rows) >= 2 and 'samples_per_s' in rows[0]:
        for r in rows[1:]:
            cpu = (f', host CPU per sample {rows[0]["host_cpu_s_per_sample"] / r["host_cpu_s_per_sample"]:.2f}x less'
                   if 'host_cpu_s_per_sample' in r else '')
            print(f'speed-up of {r["config"]} over {rows[0]["config"]}: '
                  f'{r["samples_per_s"] / rows[0]["samples_per_s"]:.2f}x{cpu}')
    for r in rows:
        if r.get('stages_ms'):
            print(f'{r["config"]}: ms per sample by stage (total {sum(r["stages_ms"].values()):.2f}):')
            print('\n'.join(f'  {k:18s} {v:7.3f}' for k, v in r['stages_ms'].items()))
        if r.get('profile'):
            print(f'{r["config"]}: cProfile of {r["num_samples"]} samples, by own time:')
            print('\n'.join(r['profile']))
        if r.get('torch_profile'):
            print(f'{r["config"]}: torch.profiler, top operators:')
            print('\n'.join(r['torch_profile']))
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
        rows = {'head': bench_head, 'attention': bench_attention}.get(args.mode, bench_train)(args, device)
    print_rows(rows)
    return rows


if __name__ == '__main__':
    main(argparse.ArgumentParser('SLIP benchmarks', parents=[get_args_parser()]).parse_args())
