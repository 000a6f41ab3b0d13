"""The pre-training engine: one optimizer step over K micro-batches, and the epoch loop around it.

main.py trains with it and bench.py times it, so a benchmark measures what users run. ``Engine`` owns autocast,
gradient accumulation, DDP and its ``no_sync``, the fp16 loss scaler, the non-finite policy, the logit-scale clamp,
the per-step learning-rate schedule and the metric sums; ``train_one_epoch`` feeds it finished batches.

An optimizer step takes K = ``update_freq`` micro-batches (``augment.Batch`` on the device):
  * K = 1: forward, loss, backward.
  * K > 1, exact (the default): the same training as one batch K times larger, up to float rounding.
      1. Without gradient, each micro-batch runs the model's towers (``model.towers``): image and text embeddings,
         and the SimCLR views' backbone features before the SSL head, a few KB per sample, kept on the device. The
         RNG state before each micro-batch is recorded.
      2. The head (``model.head``: the temperature and the BatchNorm SSL head) and the loss run once on the whole
         accumulated batch, across processes through the losses' gathers: BatchNorm normalises with the full
         batch's statistics and updates its running statistics once, and logit_scale gets one gradient. Its
         backward stops at the kept tower outputs.
      3. Each micro-batch runs its towers again with gradient, under its recorded RNG state (drop path and other
         random ops replay exactly), and back-propagates the kept gradients; DDP synchronises on the last one only.
    The towers run forward twice, so a step costs about a third more than one big batch would, with the memory of
    one micro-batch plus the kept features.
  * K > 1 with ``legacy_update_freq`` (--legacy-update-freq): the original's accumulation, where every micro-batch
    is its own contrastive batch with its own BatchNorm statistics (for exact reproduction of its runs).

Host reads: main.py's engine (``defer_reads``) reads nothing inside a step: whether the losses are finite on every
rank and their mean (which the divergence guard watches) are read, with the metrics, only where a progress line is
printed, before a checkpoint and at the epoch's end (``flush``); a non-finite step is skipped on the device meanwhile.
Otherwise each step reads its outcome once.

Reference: the gradient cache of Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup" (arXiv 2101.06983), here with the batch-coupled head and its BatchNorm inside the cached part.
"""
import math
import time
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import augment
import progress
import utils
from progress import Writers  # noqa: F401 (engine.Writers, its name before progress.py held it)
from utils import logger

LOGIT_SCALE_MAX = math.log(100)  # CLIP's clamp of the learned temperature
MAX_PENDING = 1000  # steps whose outcome a deferring engine keeps unread at most
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')  # torch.compile's modes


class _Stages(nn.Module):
    """What DDP (and torch.compile) wrap, so every stage of a step goes through them.

    mode 'full': the model's outputs; 'loss': the criterion's outputs on them (forward and loss in one graph);
    'towers': the towers' outputs alone; 'replay': the towers' outputs dotted with the kept gradients of the loss
    (plus, on the last micro-batch, the head parameters dotted with theirs), a surrogate whose backward gives every
    parameter exactly its gradient of the full-batch loss. The criterion holds no state: the module's state_dict
    is the model's, under ``model.``.
    """

    def __init__(self, model: nn.Module, criterion: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, batch: augment.Batch, mode: str = 'full', feature_grads: Optional[Dict] = None,
                head_grads: Optional[List[torch.Tensor]] = None):
        if mode == 'full':
            return self.model(batch)
        if mode == 'loss':
            return self.criterion(self.model(batch))
        features = self.model.towers(batch)
        if mode == 'towers':
            return features
        surrogate = sum(torch.sum(features[k] * g) for k, g in feature_grads.items())
        if head_grads is not None:
            params = [p for p in self.model.head_parameters() if p.requires_grad]
            surrogate = surrogate + sum(torch.sum(p * g) for p, g in zip(params, head_grads))
        return surrogate


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == 'cuda' else None)


@contextmanager
def _replayed_rng(state: tuple, device: torch.device):
    """Run a block under a recorded RNG state and restore the current one afterwards."""
    cuda = device.type == 'cuda'
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type='cuda'):
        torch.set_rng_state(state[0])
        if cuda:
            torch.cuda.set_rng_state(state[1], device)
        yield


def all_ranks_outcome(flag: torch.Tensor, loss: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[2] float32 on the device, with no host read: the number of ranks where ``flag`` (finite) fails, and the mean
    of ``loss`` over the ranks.

    The mean loss is what the divergence guard (guard.py) watches: the same value on every rank, so every rank takes
    the same rollback decision with no extra collective.
    """
    both = torch.stack([(~flag.bool()).float(), loss.detach().float()])  # [2]: non-finite count, loss
    if utils.get_world_size() > 1:
        both = both.to(device if device.type == 'cuda' else 'cpu')
        torch.distributed.all_reduce(both)
        both[1] /= utils.get_world_size()
    return both


def all_ranks_finite(flag: torch.Tensor, loss: torch.Tensor, device: torch.device) -> Tuple[bool, float]:
    """Whether ``flag`` holds on every rank, and the mean of ``loss`` over the ranks, in one host sync."""
    nonfinite, mean_loss = all_ranks_outcome(flag, loss, device).tolist()
    return nonfinite == 0, mean_loss


class NonFiniteStreak(RuntimeError):
    """Too many consecutive non-finite steps: global steps ``first`` .. ``last`` (the guard rolls back instead)."""

    def __init__(self, message: str, first: Optional[int], last: Optional[int]):
        super().__init__(message)
        self.first, self.last = first, last


class Engine:
    """The pre-training step.

    Args:
        model: the bare model (``towers``/``head``/``head_parameters``, as models.py defines them); its state_dict
            is the checkpoint's (the released key names: no ``module.`` or ``_orig_mod.``). DDP (when
            ``distributed``) and torch.compile (when ``compile``) wrap it here.
        criterion: a loss of losses.py (the model-output dict -> {'loss', metrics}).
        optimizer: built over ``model``'s parameters.
        precision: 'fp32', 'amp' (fp16 with the loss scaler) or 'amp_bf16'.
        update_freq: micro-batches per optimizer step (K above); ``legacy_update_freq`` the original's semantics.
        max_nonfinite: stop after this many consecutive steps with a non-finite loss (each is skipped), raising
            NonFiniteStreak, which main.py's divergence guard turns into a rollback.
        compile: torch.compile the forward and loss (and the exact accumulation's towers and replay) as whole graphs
            (``fullgraph``: a graph break is an error) with static shapes: one graph per text length, which the
            collate rounds to --text-pad-multiple, so a run compiles a handful of times. ``compile_backend``:
            torch.compile's backend (tests use 'eager' / 'aot_eager' on the CPU). The first step logs its time.
            ``compile_mode``: torch.compile's mode (inductor only); 'reduce-overhead' and 'max-autotune' replay the
            graphs as CUDA graphs on CUDA: each step then starts a new CUDA-graph generation, and exact
            accumulation keeps copies of the towers' outputs (a replay overwrites its outputs).
        defer_reads: the host learns a step's outcome (finite on every rank? its mean loss) later, in one read for
            all the steps since the last one (``flush``: main.py's progress lines, checkpoints and epoch ends), so a
            device runs step N while the host queues step N+1. A non-finite step is then skipped on the device
            (fused AdamW's ``found_inf``: parameters and optimizer state stay bitwise as they were), and the streak,
            the warnings and ``on_result`` (the divergence guard) follow at the flush, step by step, as they would
            have right after each step. Only with an optimizer that skips on the device and without fp16's loss
            scaler (which reads its own found_inf); otherwise (and by default) every step is read at once.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, *,
                 device: torch.device, precision: str = 'fp32', update_freq: int = 1, legacy_update_freq: bool = False,
                 max_nonfinite: int = 5, distributed: bool = False, compile: bool = False,
                 compile_backend: str = 'inductor', compile_mode: str = 'default', defer_reads: bool = False):
        if update_freq < 1:
            raise ValueError(f'--update-freq must be >= 1, got {update_freq}')
        self._stages = _Stages(model, criterion)
        self.model, self.optimizer = model, optimizer
        self.device, self.precision = device, precision
        self.scaler = utils.grad_scaler(precision, device)
        self.update_freq = update_freq
        self.exact = update_freq > 1 and not legacy_update_freq
        self.max_nonfinite = max_nonfinite
        stages = self._stages
        if compile:  # per text length up to three graphs (the loss; or the towers, a replay and the last replay,
            # which also hands back the head's gradients): room for every length 1..77 (dynamo's default is 8)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 3 * 77 + 1)
        # DDP wraps the compiled module: compiling DDP itself breaks the graph at DDP's forward (its logger), which
        # fullgraph refuses; inside DDP the whole step stays one graph (its gradients are all-reduced after it)
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f'--compile-mode must be one of {COMPILE_MODES}, got {compile_mode!r}')
        if compile and compile_mode != 'default' and compile_backend != 'inductor':
            raise ValueError(f'--compile-mode {compile_mode} needs the inductor backend, not {compile_backend!r}')
        mode = {'mode': compile_mode} if compile_mode != 'default' else {}
        net = torch.compile(stages, fullgraph=True, dynamic=False, backend=compile_backend, **mode) if compile \
            else stages
        self.cuda_graphs = compile and device.type == 'cuda' and compile_mode in ('reduce-overhead', 'max-autotune')
        self.ddp = None
        if distributed:
            net = self.ddp = nn.parallel.DistributedDataParallel(
                net, device_ids=[device] if device.type == 'cuda' else None, bucket_cap_mb=200)
        self.eager = net if not compile else stages  # the uncompiled step (bench.py counts its FLOPs)
        self.net = net
        self.compile_pending = compile  # the first step compiles: its time is logged
        self.compile_s: Optional[float] = None  # and kept (bench.py reports it)
        self.schedule = None
        self.streak = 0  # consecutive non-finite steps
        self.streak_start: Optional[int] = None  # the global step that began them
        self.last_loss = float('nan')  # the last step's loss, averaged over ranks (host value)
        self.global_step: Optional[int] = None  # the step being taken (fault injection reads it)
        self.skipped = 0  # non-finite steps skipped in this epoch (train_one_epoch resets it)
        self._sums: Dict[str, torch.Tensor] = {}  # metric sums on the device since the last read_metrics()
        self._steps = 0
        self.defer_reads = (defer_reads and not self.scaler.is_enabled() and bool(optimizer.defaults.get('fused'))
                            and getattr(optimizer, '_step_supports_amp_scaling', False))
        self._pending: List[Tuple[Optional[int], str, object]] = []  # (global step, where, outcome) not yet read
        self.on_result: Optional[Callable[[int], None]] = None  # after each step's outcome is read (the guard)
        self.before_step: Optional[Callable[[Optional[int]], None]] = None  # before each step (fault injection)

    @property
    def criterion(self) -> nn.Module:
        """The loss the step runs (inside the wrapped module; replacing it, as faults.install does, reaches there)."""
        return self._stages.criterion

    @criterion.setter
    def criterion(self, criterion: nn.Module) -> None:
        self._stages.criterion = criterion

    # -- the step ----------------------------------------------------------------------------------------------
    def set_schedule(self, schedule: Sequence[float]) -> None:
        """One learning rate per optimizer step of the run (utils.cosine_scheduler)."""
        self.schedule = schedule

    def train(self) -> None:
        self.net.train()

    def reset_state(self) -> None:
        """Back to a freshly built engine's state (a rollback): no gradients (a step stopped by NonFiniteStreak
        leaves its non-finite ones), no non-finite streak, no unread metrics."""
        self.optimizer.zero_grad(set_to_none=True)
        self.streak, self.streak_start, self.skipped, self.last_loss = 0, None, 0, float('nan')
        self._sums, self._steps, self._pending = {}, 0, []

    def step(self, micro_batches: Sequence[augment.Batch], global_step: Optional[int] = None,
             where: str = '') -> Optional[bool]:
        """One optimizer step over ``micro_batches``; returns whether it was taken (False: non-finite, skipped), or
        None with ``defer_reads`` (known at the next ``flush``)."""
        if len(micro_batches) != self.update_freq:
            raise ValueError(f'an optimizer step takes {self.update_freq} micro-batches, got {len(micro_batches)}')
        self.global_step = global_step
        if self.before_step is not None:
            self.before_step(global_step)
        if self.schedule is not None and global_step is not None:
            for group in self.optimizer.param_groups:
                group['lr'] = float(self.schedule[global_step])
        t_compile = time.perf_counter() if self.compile_pending else None
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs may be overwritten now
        metrics, outcome = self.forward_backward(micro_batches)
        if t_compile is not None:
            if self.device.type == 'cuda':
                torch.cuda.synchronize(self.device)  # the compiled step's run, not only its launch
            self.compile_pending, self.compile_s = False, time.perf_counter() - t_compile
            logger.info('compile took %.1f s (the first compiled step, its run included)', self.compile_s)
        self._pending.append((global_step, where, outcome))
        taken = None
        if self.defer_reads:
            self.optimizer.found_inf = (outcome[0] > 0).float()  # 1: the fused step leaves everything as it was
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            if len(self._pending) >= MAX_PENDING:  # a caller that never flushes (bench.py) keeps little
                self.flush()
        else:
            taken = self.flush()[-1]  # raises NonFiniteStreak
            if taken:
                self.scaler.step(self.optimizer)
                self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        logit_scale = self._clamp_logit_scale()
        if logit_scale is not None:
            metrics['logit_scale'] = logit_scale
        self._add_metrics(metrics)
        return taken

    def flush(self) -> List[bool]:
        """Read the outcome of every step not read yet (one host read) and act on each in order, as right after it:
        the loss the guard watches (``last_loss``), the non-finite streak and its warning (NonFiniteStreak after
        ``max_nonfinite`` in a row), then ``on_result(global_step)``. Returns whether each step was taken."""
        pending, self._pending = self._pending, []
        queued = [o for _, _, o in pending if isinstance(o, torch.Tensor)]
        values = iter(torch.stack(queued).tolist() if queued else [])
        taken = []
        for global_step, where, outcome in pending:
            nonfinite, self.last_loss = next(values) if isinstance(outcome, torch.Tensor) else outcome
            taken.append(nonfinite == 0)
            if nonfinite:
                self.streak += 1
                self.skipped += 1
                self.streak_start = global_step if self.streak == 1 else self.streak_start
                logger.warning('%s: non-finite loss, step skipped (%d in a row)', where or 'step', self.streak)
                if self.streak >= self.max_nonfinite:
                    raise NonFiniteStreak(f'{self.streak} consecutive steps with a non-finite loss ({where}): lower '
                                          f'--lr, try --precision amp_bf16/fp32, or check the data',
                                          self.streak_start, global_step)
            else:
                self.streak = 0
            if self.on_result is not None and global_step is not None:
                self.on_result(global_step)
        return taken

    def forward_backward(self, micro_batches: Sequence[augment.Batch]) -> Tuple[Dict[str, torch.Tensor], object]:
        """Accumulate the gradient of one optimizer step in ``.grad``; returns (detached metrics, the outcome): the
        number of ranks with a non-finite loss and the mean loss, [2] on the device (``all_ranks_outcome``) or, when
        it had to be read already, as a host pair."""
        if self.exact:
            return self._exact(micro_batches)
        return self._plain(micro_batches)

    def _autocast(self):
        return utils.autocast(self.precision, self.device)

    def _sync(self, last: bool):
        """DDP synchronises gradients on the last micro-batch of a step only."""
        return self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()

    def _plain(self, micro_batches):
        k = len(micro_batches)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        metrics: Dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            with self._sync(i == k - 1):
                with self._autocast():
                    out = self.net(batch, mode='loss')
                self.scaler.scale(out['loss'] / k).backward()
            finite &= torch.isfinite(out['loss']).all()
            for name, v in out.items():
                metrics[name] = metrics.get(name, 0) + v.detach() / k
        return metrics, all_ranks_outcome(finite, metrics['loss'], self.device)

    def _exact(self, micro_batches):
        # 1. the towers of every micro-batch, without gradient, and the RNG state each started from
        states, outputs = [], []
        with torch.no_grad():
            for batch in micro_batches:
                states.append(_rng_state(self.device))
                with self._autocast():
                    out = self.net(batch, mode='towers')
                outputs.append({k: v.clone() for k, v in out.items()} if self.cuda_graphs else out)
        # 2. the head and the loss, once, on the whole accumulated batch
        kept = {k: torch.cat([o[k] for o in outputs]).detach().requires_grad_() for k in outputs[0]}
        head_params = [p for p in self.model.head_parameters() if p.requires_grad]
        with self._autocast():
            out = self.criterion(self.model.head(kept))
        metrics = {name: v.detach() for name, v in out.items()}
        outcome = all_ranks_outcome(torch.isfinite(out['loss']).all(), out['loss'], self.device)
        if not self.defer_reads:  # read now: a non-finite loss spares the backward and the replay
            outcome = outcome.tolist()
            if outcome[0]:
                return metrics, outcome
        if any(p.grad is not None for p in head_params):
            raise RuntimeError('exact accumulation starts from cleared gradients (optimizer.zero_grad)')
        with self._sync(False):  # the graph holds only the kept outputs and the head: DDP has nothing to reduce yet
            self.scaler.scale(out['loss']).backward()
        # the head's gradients are handed back on the last micro-batch, so DDP reduces them with all the others
        head_grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in head_params]
        for p in head_params:
            p.grad = None
        sizes = [len(o[next(iter(o))]) for o in outputs]
        feature_grads = {k: v.grad.split(sizes) for k, v in kept.items()}
        # 3. each micro-batch again, with gradient, under its recorded RNG state
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with self._sync(last), _replayed_rng(states[i], self.device):
                with self._autocast():
                    grads_i = {k: g[i] for k, g in feature_grads.items()}
                    surrogate = self.net(batch, mode='replay', feature_grads=grads_i,
                                         head_grads=head_grads if last else None)
                surrogate.backward()
        return metrics, outcome

    def _clamp_logit_scale(self) -> Optional[torch.Tensor]:
        if not hasattr(self.model, 'logit_scale'):
            return None
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
            return self.model.logit_scale.detach().exp()

    # -- metrics -----------------------------------------------------------------------------------------------
    def _add_metrics(self, metrics: Dict[str, torch.Tensor]) -> None:
        for name, v in metrics.items():
            v = v.detach().to(torch.float64)
            self._sums[name] = self._sums[name] + v if name in self._sums else v
        self._steps += 1

    def read_metrics(self) -> Tuple[Dict[str, float], int]:
        """The mean of each metric over the steps since the last read, and their number (one host sync)."""
        if not self._steps:
            return {}, 0
        names = list(self._sums)
        values = (torch.stack([self._sums[n] for n in names]) / self._steps).tolist()
        steps, self._sums, self._steps = self._steps, {}, 0
        return dict(zip(names, values)), steps


# ----------------------------------------------------------------------------------------------------------------
# The epoch loop
# ----------------------------------------------------------------------------------------------------------------
def train_one_epoch(engine: Engine, loader, epoch: int, first_step: int, iters_per_epoch: int, args,
                    writer: Optional[Writers] = None, on_step: Optional[Callable[[int], None]] = None,
                    skip: Optional[Callable[[int], bool]] = None) -> Dict:
    """Train optimizer steps ``first_step .. iters_per_epoch - 1`` of ``epoch`` from ``loader``'s batches.

    Reads ``args.print_freq``, ``args.epochs``, ``args.batch_size``, ``args.world_size``, ``args.max_bad_fraction``.
    ``on_step(step)`` is called after every optimizer step (main.py's mid-epoch checkpoints, which therefore fall on
    optimizer-step boundaries; the divergence guard is the engine's ``on_result``, called as outcomes are read). A
    step for which ``skip(step)`` is true (a window skipped after a rollback) reads its micro-batches and discards
    them untrained, so the data stream stays where it would be for every data format. Returns the epoch's metric
    averages (synchronised over ranks), the last learning rate, and the counts of bad samples, non-finite skipped
    steps and discarded steps.
    """
    device, k = engine.device, engine.update_freq
    engine.train()
    engine.skipped = 0
    meters = utils.MetricLogger(device if device.type == 'cuda' else None)
    counts = torch.zeros(2, dtype=torch.float64)  # bad samples, samples seen
    batches = iter(loader)  # every rank gets the same number of batches (map-style and WebDataset alike)
    wait, t_epoch, step, discarded = 0.0, time.perf_counter(), first_step, 0
    for step in range(first_step, iters_per_epoch):
        micro = []
        for _ in range(k):
            t = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - t  # the data-wait share is measured per micro-batch
            if batch is None:
                break
            if skip is not None and skip(step):
                micro.append(None)  # read, then dropped: the step is skipped
                continue
            micro.append(batch)  # finished on the device by the loader (train_data.DeviceBatches)
            counts[0] += batch.n_bad.sum()  # n_bad stays on the host (augment.Batch.HOST): no device read
            counts[1] += len(batch.n_bad)
        if len(micro) < k:
            logger.warning('epoch %d: the data ran out after %d of %d steps', epoch, step, iters_per_epoch)
            break
        if micro[0] is None:
            discarded += 1
            continue
        engine.step(micro, iters_per_epoch * epoch + step, where=f'epoch {epoch} step {step}')
        if (step + 1) % args.print_freq == 0 or step + 1 == iters_per_epoch:
            _report(engine, meters, counts, args, epoch, step, iters_per_epoch, wait, t_epoch, first_step, writer)
        if on_step is not None:
            on_step(step + 1)
    engine.flush()  # the outcome of the steps since the last progress line (the guard may still raise)
    values, n = engine.read_metrics()
    if n:
        meters.update(n=n * args.batch_size * k, **values)
    meters.synchronize()
    _check_bad_fraction(counts, args, epoch)
    return {**meters.averages(), 'lr': engine.optimizer.param_groups[0]['lr'], 'bad_samples': int(counts[0]),
            'skipped_steps': engine.skipped, 'discarded_steps': discarded}


def _check_bad_fraction(counts, args, epoch):
    total = counts.clone()
    if utils.get_world_size() > 1:
        torch.distributed.all_reduce(total)
    bad, seen = float(total[0]), float(total[1])
    if bad:
        logger.warning('epoch %d: %d of %d images were missing or undecodable and were replaced', epoch, bad, seen)
    if seen and bad / seen > args.max_bad_fraction:
        raise RuntimeError(f'{bad:.0f} of {seen:.0f} images ({100 * bad / seen:.1f}%) are missing or undecodable, '
                           f'more than --max-bad-fraction {args.max_bad_fraction}: check --root and --metadata')


def _report(engine, meters, counts, args, epoch, step, iters, wait, t_epoch, first_step, writer):
    engine.flush()  # the steps' outcomes: non-finite warnings and the guard come before their progress line
    values, n = engine.read_metrics()
    meters.update(n=n * args.batch_size * engine.update_freq, **values)
    elapsed = time.perf_counter() - t_epoch
    done = step + 1 - first_step
    samples_s = progress.rate(done * args.batch_size * engine.update_freq * args.world_size, elapsed)
    eta = progress.eta(done, (iters - step - 1) + iters * (args.epochs - epoch - 1), elapsed)  # steps left, in s
    lr = engine.optimizer.param_groups[0]['lr']
    logger.info('Epoch [%d][%d/%d] %s  lr %.3g  %.1f samples/s  data %.0f%%  ETA %s  mem %.2f GB  bad %d', epoch,
                step + 1, iters, meters, lr, samples_s, 100 * wait / max(elapsed, 1e-9), utils.format_seconds(eta),
                utils.peak_memory_gb(engine.device), int(counts[0]))
    if writer is not None:
        writer.scalars({**values, 'lr': lr, 'samples_per_s': samples_s, 'data_wait': wait / max(elapsed, 1e-9)},
                       iters * epoch + step + 1, prefix='train/')
