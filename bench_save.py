"""Benchmark: how long a checkpoint save stops training, written in the training thread or in the background.

A real model and its AdamW state (one optimizer step, so the moments exist), saved as main.py saves them:
    python bench_save.py --model SLIP_VITB16 --device cpu --saves 3
    python bench_save.py --model SLIP_VITB16 --device cuda --modes async --saves 3      (bench_gpu.sh)

Three ways (``--modes``: all by default), each ``--saves`` times, in one process:
  sync           the path main.py took before issue 19: the training thread serialises, writes and fsyncs the file
                 (checkpoints.atomic_write; it waits for all of it)
  sync-verified  checkpoints.CheckpointManager with --no-async-save: the same plus the read-back verification
  async          checkpoints.CheckpointManager (main.py's default): the training thread waits for the host copy
                 only (on CUDA: only to enqueue it); a background thread writes and verifies

``stall_s`` is what the training thread waits per save (the next save is started only after the previous write, so
it never waits for one here); ``copied_s`` the time until the device is idle again (on CUDA the async way's copies
are done then: the next steps wait for them on the device, not in the training thread); ``write_s`` the time to a
verified file on disk. The async way reserves its host
buffers first (pinned on CUDA), as main.py does before the first step, and every save reuses them. Each save prints
one table row and one JSON line; the summary gives the steady-state stall of each way, the median over the saves
after the first, as a line and as a JSON line (``"summary": true``).
"""
import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch

import checkpoints
import models


MODES = ('sync', 'sync-verified', 'async')


def _modes(text: str) -> tuple:
    modes = tuple(m.strip() for m in text.split(',') if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f'--modes {text!r}: expected a comma-separated list of {", ".join(MODES)}')
    return modes


def get_args_parser():
    p = argparse.ArgumentParser('checkpoint save benchmark', add_help=False)
    p.add_argument('--model', default='SLIP_VITB16', help='a model of models.py (the *_TINY ones for a quick check)')
    p.add_argument('--device', default='cpu', help='where the model and its optimizer state live: cpu or cuda')
    p.add_argument('--saves', default=3, type=int, help='saves of each way')
    p.add_argument('--modes', default=','.join(MODES), type=_modes,
                   help=f'comma-separated ways to time, of {",".join(MODES)} (e.g. async alone on a short GPU slot)')
    p.add_argument('--output-dir', default=None,
                   help='folder the checkpoints are written to (default: a temporary folder; removed afterwards)')
    p.add_argument('--keep', action='store_true', help='keep the written checkpoints')
    return p


def make_state(name: str, device: torch.device):
    """``state_fn() -> dict`` building main.py's checkpoint of ``name`` after one AdamW step, and a ``step()`` that
    changes every tensor in place, as training does between two saves."""
    import main  # main.py's optimizer (parameter groups, fused AdamW)
    model = models.create_model(models.resolve_name(name)).to(device)
    train_args = main.get_args_parser().parse_args(['--model', name])
    optimizer = main.build_optimizer(model, train_args, device)
    for p in model.parameters():  # one step from a synthetic gradient: the AdamW moments exist and are full size
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    args = vars(train_args)

    def state_fn(step: int = 0):
        return {'epoch': 0, 'step': step, 'best_acc1': 0.0, 'args': args,
                'state_dict': {'module.' + k: v for k, v in model.state_dict().items()},
                'optimizer': optimizer.state_dict(), 'scaler': {}}

    def train_step():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-6)
    return state_fn, train_step


def _sync_device(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def bench_save(args) -> list:
    """Time ``args.saves`` saves of each way; returns one dict per save (mode, save, stall_s, write_s,
    checkpoint_mb)."""
    device = torch.device(args.device)
    folder = args.output_dir or tempfile.mkdtemp(prefix='bench_save_')
    os.makedirs(folder, exist_ok=True)
    state_fn, train_step = make_state(args.model, device)
    rows = []
    modes = getattr(args, 'modes', None) or MODES  # a Namespace built by hand (tests) may leave it out
    try:
        for mode in modes:
            sub = os.path.join(folder, mode)
            manager = None if mode == 'sync' else checkpoints.CheckpointManager(sub, keep=1,
                                                                                async_save=mode == 'async')
            if mode == 'async':
                t = time.perf_counter()
                manager.reserve(state_fn())  # as main.py does before the first step
                print(f'{args.model:>12} {device.type:>5} {mode:>14} host buffers reserved in '
                      f'{time.perf_counter() - t:.3f} s', flush=True)
            for i in range(args.saves):
                train_step()
                _sync_device(device)
                t = time.perf_counter()
                if manager is None:
                    _save_unverified(state_fn(i), sub)
                else:
                    manager.save(state_fn(i))
                stall = time.perf_counter() - t
                _sync_device(device)  # CUDA: the copies the next steps wait for on the device
                copies = time.perf_counter() - t
                if manager is not None:
                    manager.wait()  # the write is done before the next save: no save waits for another here
                written = time.perf_counter() - t
                size = os.path.getsize(os.path.join(sub, 'checkpoint.pt')) / 2 ** 20
                rows.append({'model': args.model, 'device': device.type, 'mode': mode, 'save': i,
                             'stall_s': stall, 'copied_s': copies, 'write_s': written, 'checkpoint_mb': size})
                on_device = f' (device copies done after {copies:.3f} s)' if device.type == 'cuda' else ''
                print(f'{args.model:>12} {device.type:>5} {mode:>14} save {i}: training waits {stall:8.3f} s'
                      f'{on_device}; file verified on disk after {written:8.3f} s ({size:.0f} MB)', flush=True)
                print(json.dumps(rows[-1]), flush=True)
            if manager is not None:
                manager.close()
    finally:
        if not args.keep:
            for mode in modes:
                shutil.rmtree(os.path.join(folder, mode), ignore_errors=True)
            if args.output_dir is None:
                shutil.rmtree(folder, ignore_errors=True)
    return rows


def _save_unverified(state: dict, folder: str) -> None:
    """The training-thread save of before issue 19: serialise, write, fsync and rename, with no read-back."""
    os.makedirs(folder, exist_ok=True)
    state = dict(state, args=checkpoints.args_to_dict(state.get('args')))
    with checkpoints.atomic_write(os.path.join(folder, 'checkpoint.pt')) as f:
        torch.save(state, f)


def summarize(rows: list) -> dict:
    """The steady state of each way: the median stall and write time over the saves after the first (over all of
    them when there is one)."""
    summary = {}
    for mode in dict.fromkeys(r['mode'] for r in rows):
        runs = [r for r in rows if r['mode'] == mode]
        steady = runs[1:] or runs
        summary[mode] = {key: statistics.median(r[key] for r in steady) for key in ('stall_s', 'copied_s', 'write_s')}
        summary[mode]['saves'] = len(steady)
    return summary


def main(args):
    rows = bench_save(args)
    summary = summarize(rows)
    for mode, s in summary.items():
        on_device = f'device copies done after {s["copied_s"]:.3f} s; ' if rows[0]['device'] == 'cuda' else ''
        print(f'{mode:>14}: training waits {s["stall_s"]:.3f} s per save (steady state, median of {s["saves"]}); '
              f'{on_device}verified on disk after {s["write_s"]:.3f} s', flush=True)
        print(json.dumps({'model': args.model, 'device': rows[0]['device'], 'mode': mode, 'summary': True,
                          **{f'steady_{k}': v for k, v in s.items()}}), flush=True)
    if 'sync' in summary and 'async' in summary:
        print(f'async stall / sync stall = {summary["async"]["stall_s"] / summary["sync"]["stall_s"]:.3f}')
    return rows


if __name__ == '__main__':
    main(argparse.ArgumentParser('checkpoint save benchmark', parents=[get_args_parser()]).parse_args())
