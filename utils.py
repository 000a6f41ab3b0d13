"""Shared helpers: distributed setup and gathers, schedule, meters, AMP, resume checks, tokenizer, logging.

Everything degrades to a single process: without a process group, rank is 0, world size 1 and the gathers return
their input. The device is resolved once in ``init_distributed_mode`` and passed down; nothing here hard-codes a
CUDA device.

Checkpoint files (the safe loader, ``save_checkpoint``, ``CheckpointError``) are checkpoints.py's; they are
re-exported here, so ``utils.load_checkpoint`` and the other names keep working.

References: MAE/DeiT ``util/misc.py`` (MetricLogger shape), SLIP ``utils.py`` (GatherLayer semantics).
"""
import argparse
import datetime
import json
import logging
import os
import re
from collections import defaultdict
from contextlib import nullcontext
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from checkpoints import (  # noqa: F401 (re-exported: utils.load_checkpoint, utils.CheckpointError, ...)
    LEGACY_PREFIXES, NUMPY_SCALAR, SAFE_GLOBALS, CheckpointError, _plain, args_to_dict, current_model_name,
    load_checkpoint, save_checkpoint, strip_prefix)

logger = logging.getLogger('slip')


# ----------------------------------------------------------------------------------------------------------------
# Distributed
# ----------------------------------------------------------------------------------------------------------------
def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def resolve_device(name: Optional[str], local_rank: int = 0) -> torch.device:
    """'cuda' (default when available) picks the local rank's GPU; anything else is taken as given."""
    name = name or ('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise RuntimeError(f'--device {name} asked for, but CUDA is not available on this machine')
        if device.index is None:
            device = torch.device('cuda', local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``node[001-004,010]`` -> node001, ``a,b`` -> a, ``gpu-01`` -> gpu-01,
    ``rack[1-2]-n[07-08]`` -> rack1-n07 (zero padding kept)."""
    depth, first = 0, ''
    for ch in nodelist.strip():  # the first comma-separated entry outside brackets
        if ch == ',' and depth == 0:
            break
        depth += (ch == '[') - (ch == ']')
        first += ch
    # each bracket group: its first item, and of a range its start
    return re.sub(r'\[([^\]]*)\]', lambda m: m.group(1).split(',')[0].split('-')[0], first)


def master_port_for_job(job_id: str) -> int:
    """A port every task of a job agrees on without talking, different for concurrent jobs (ids differ)."""
    digits = re.sub(r'\D', '', str(job_id)) or '0'
    return 20000 + int(digits) % 20000


def init_distributed_mode(args: argparse.Namespace) -> torch.device:
    """Read torchrun or Slurm variables, start the process group and return this process's device.

    Sets ``args.rank``, ``args.world_size``, ``args.local_rank``, ``args.gpu``, ``args.distributed`` and
    ``args.device``. Backend: nccl on CUDA, gloo on CPU (``--dist-backend`` is only a hint for CUDA).
    """
    env = os.environ
    if 'RANK' in env and 'WORLD_SIZE' in env:  # torchrun / torch.distributed.launch
        rank, world_size, local_rank = int(env['RANK']), int(env['WORLD_SIZE']), int(env.get('LOCAL_RANK', 0))
    elif 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', args.world_size or 1)) > 1:
        rank = int(env['SLURM_PROCID'])
        world_size = int(env.get('SLURM_NTASKS', args.world_size))
        local_rank = int(env.get('SLURM_LOCALID', 0))
        # A plain `srun python main.py` (no torchrun, no submitit) sets no rendezvous: without these the env://
        # init would fail or wait out its timeout. Every task derives the same values from the job's variables.
        if 'MASTER_ADDR' not in env:
            env['MASTER_ADDR'] = first_slurm_host(env.get('SLURM_JOB_NODELIST', env.get('SLURM_NODELIST', '')))
        if 'MASTER_PORT' not in env:
            env['MASTER_PORT'] = str(master_port_for_job(env.get('SLURM_JOB_ID', '0')))
        logger.info('Slurm rendezvous %s:%s', env['MASTER_ADDR'], env['MASTER_PORT'])
    else:
        rank, world_size, local_rank = 0, 1, 0
    device = resolve_device(args.device, local_rank)
    args.rank, args.world_size, args.local_rank, args.device = rank, world_size, local_rank, str(device)
    args.gpu = device.index if device.type == 'cuda' else None
    args.distributed = world_size > 1
    if args.distributed and not is_dist_avail_and_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        url = args.dist_url
        dist.init_process_group(backend, init_method=url, world_size=world_size, rank=rank,
                                timeout=datetime.timedelta(minutes=30))
        dist.barrier()
    setup_logging(rank)
    logger.info('rank %d / %d on %s (distributed: %s)', rank, world_size, device, args.distributed)
    return device


def cleanup_distributed() -> None:
    """Wait for every rank, then tear the process group down (a clean exit under torchrun)."""
    if is_dist_avail_and_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_batch(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Concatenate each tensor over ranks along dim 0, without gradient (the input itself at world size 1)."""
    world_size = get_world_size()
    if world_size == 1:
        return list(tensors)
    out = []
    for t in tensors:
        buf = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(buf, t.detach().contiguous())
        out.append(torch.cat(buf))
    return out


class GatherLayer(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    With DDP's gradient averaging this gives each parameter exactly the gradient of the full-batch loss
    (mean of the per-rank losses), which is what a single process with the whole batch would compute.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        all_grads = torch.stack(grads)  # [W, B, ...]
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def all_gather_batch_with_grad(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    if get_world_size() == 1:
        return list(tensors)
    return [torch.cat(GatherLayer.apply(t)) for t in tensors]


# ----------------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------------
def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0,
                     start_warmup_value: float = 0.0) -> np.ndarray:
    """One value per optimizer step: linear warm-up (end points included), then a half cosine to final_value."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    steps = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / max(len(steps), 1)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


# ----------------------------------------------------------------------------------------------------------------
# Meters
# ----------------------------------------------------------------------------------------------------------------
class AverageMeter:
    """Weighted running average whose ``synchronize`` sums (sum, count) over ranks exactly (float64, no truncation)."""

    def __init__(self):
        self.sum, self.count, self.val = 0.0, 0.0, 0.0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1e-12)

    def synchronize(self, device: Optional[torch.device] = None) -> None:
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.sum, self.count], dtype=torch.float64, device=device or 'cpu')
        dist.all_reduce(t)
        self.sum, self.count = t.tolist()


class MetricLogger:
    """A dict of AverageMeters created on first use from whatever keys are logged (MAE style)."""

    def __init__(self, device: Optional[torch.device] = None):
        self.meters: Dict[str, AverageMeter] = defaultdict(AverageMeter)
        self.device = device

    def update(self, n: int = 1, **values: Any) -> None:
        for k, v in values.items():
            self.meters[k].update(v.item() if torch.is_tensor(v) else v, n)

    def synchronize(self) -> None:
        for name in sorted(self.meters):  # same order on every rank
            self.meters[name].synchronize(self.device)

    def averages(self) -> Dict[str, float]:
        return {k: m.avg for k, m in self.meters.items()}

    def __str__(self) -> str:
        return '  '.join(f'{k} {m.val:.4g} ({m.avg:.4g})' for k, m in self.meters.items())


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Iterable[int] = (1,)) -> List[float]:
    """Top-k accuracies in percent of the batch."""
    with torch.no_grad():
        maxk = min(max(topk), output.shape[1])
        pred = output.topk(maxk, dim=1).indices  # [B, k]
        correct = pred.eq(target[:, None])
        return [correct[:, :min(k, maxk)].any(dim=1).float().mean().item() * 100 for k in topk]


# ----------------------------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------------------------
PRECISIONS = ('amp', 'amp_bf16', 'fp32')


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX). Without them (e.g. AVX2-only CPUs)
    bf16 matmuls are emulated and run many times slower than fp32."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = f.read()
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def default_precision(device: torch.device) -> str:
    """bf16 autocast where the device runs it natively (Ampere+ GPUs, CPUs with AVX512-BF16/AMX); fp16 AMP on older
    GPUs; fp32 on CPUs without bf16 instructions."""
    if device.type == 'cuda':
        return 'amp_bf16' if torch.cuda.is_bf16_supported() else 'amp'
    return 'amp_bf16' if cpu_has_native_bf16() else 'fp32'


def autocast(precision: str, device: torch.device):
    """Context manager for the forward pass: fp16 (amp), bf16 (amp_bf16) or nothing (fp32)."""
    if precision == 'fp32':
        return nullcontext()
    dtype = torch.float16 if precision == 'amp' else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler that is active only for fp16 (bf16 and fp32 need none); always has a state_dict."""
    return torch.amp.GradScaler(device.type, enabled=precision == 'amp')


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: the files are checkpoints.py's (re-exported here: the original's calls and ours keep working); here
# the checks of what a loaded checkpoint holds
# ----------------------------------------------------------------------------------------------------------------
def check_resume_args(stored: Dict[str, Any], new: Dict[str, Any], fields: Sequence[str], path: str,
                      override: bool, override_flag: str = '--resume-override', dash: bool = True) -> List[str]:
    """Compare the training-defining arguments of a checkpoint with the new run's before resuming from it.

    A field the checkpoint lacks (released or older files) is not a mismatch: it is logged. Lists and tuples compare
    equal when their items do. Returns the differences (as "--flag: old -> new" lines).

    Raises:
        SystemExit: naming every differing field with its old and new value and ``override_flag``, unless
            ``override`` (then the differences are logged as a warning and the resume goes on).
    """
    def norm(v: Any) -> Any:
        v = _plain(v)
        return [norm(x) for x in v] if isinstance(v, (list, tuple)) else v

    flag = (lambda f: '--' + f.replace('_', '-')) if dash else (lambda f: '--' + f)
    missing = [f for f in fields if f not in stored]
    diffs = [f'{flag(f)}: checkpoint {stored[f]!r}, now {new.get(f)!r}' for f in fields
             if f in stored and norm(stored[f]) != norm(new.get(f))]
    if missing:
        logger.info('resume from %s: the checkpoint does not record %s (not checked)', path, ', '.join(missing))
    if diffs and not override:
        raise SystemExit(f'refusing to resume from {path}: it was trained with other settings, which would silently '
                         f'change the data split or the schedule:\n  ' + '\n  '.join(diffs) +
                         f'\nUse another output directory for a new run, or pass {override_flag} to resume anyway.')
    if diffs:
        logger.warning('resume from %s with %s; changed settings:\n  %s', path, override_flag, '\n  '.join(diffs))
    return diffs


def load_state_dict_checked(model: torch.nn.Module, state_dict: Dict[str, torch.Tensor], path: str = '',
                            strict: bool = True):
    """load_state_dict with an error that names the file and the first mismatching keys."""
    own = model.state_dict()
    bad_shapes = [f'{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}'
                  for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if bad_shapes or (strict and (missing or unexpected)):
        raise CheckpointError(f'checkpoint {path!r} does not fit {type(model).__name__}: '
                              f'{len(missing)} missing (first: {missing[:5]}), {len(unexpected)} unexpected '
                              f'(first: {unexpected[:5]}), shape mismatches: {bad_shapes[:5]}')
    return model.load_state_dict(state_dict, strict=strict)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer, logging, misc
# ----------------------------------------------------------------------------------------------------------------
class Tokenizer:
    """OpenAI CLIP's BPE tokenizer from open_clip_torch (which ships the vocabulary).

    ``tokenizer(str)`` -> LongTensor [77]; ``tokenizer(list)`` -> [N, 77]. Ids: start 49406, end 49407, pad 0.
    Over-long captions are cut so that the end-of-text token stays at the last position.
    """

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer  # imported lazily: open_clip is slow to import
        self.context_length = context_length
        self._tok = SimpleTokenizer(context_length=context_length)

    def __call__(self, texts):
        single = isinstance(texts, str)
        ids = self._tok([texts] if single else list(texts), context_length=self.context_length)
        return ids[0] if single else ids


def setup_logging(rank: int = 0) -> None:
    """INFO on rank 0 and WARNING elsewhere, to stdout, configured once per process."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
        logger.addHandler(handler)
        logger.propagate = False


def append_json_line(path: str, record: Dict[str, Any]) -> None:
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def default_workers(cap: int = 10) -> int:
    """Data loader workers by default: the CPU cores this process may use, at most ``cap`` (and at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cap, cores))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux reports KiB
    except ImportError:
        return float('nan')

