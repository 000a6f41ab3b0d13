"""Long runs that heal themselves: the divergence guard and what a rollback records.

A run that diverges (a loss spike that does not come down, or a streak of non-finite losses) is rolled back to the
newest checkpoint taken before the spike began, skips the batches of the window that led to it, optionally lowers the
peak learning rate, and goes on; after ``--max-rollbacks`` rollbacks it stops, naming the steps. This is what the
large-model logbooks did by hand: OPT-175B (Zhang et al., arXiv 2205.01068, section 2.5 and its logbook) restarted
from earlier checkpoints and lowered the learning rate; PaLM (Chowdhery et al., arXiv 2204.02311, section 5.1)
restarted about 100 steps before a spike and skipped 200-500 batches, which removed the spikes without a change of
data or schedule.

The statistic. The reference is the median of the last ``window`` accepted losses (those not flagged), and the
spread 1.4826 x their median absolute deviation (MAD; a standard deviation for Gaussian noise, but robust to the
outliers a spike brings). A step is flagged when its loss exceeds median + k x max(spread, 0.5% of the median)
(the floor keeps a nearly constant loss from flagging rounding noise). ``patience`` flagged steps in a row are a
divergence. Only upward deviations count, so a falling loss, however fast, never triggers (it sits below the median
of its recent past). No decision is taken before the window is full.

Positions. ``global step`` counts optimizer steps from 0 over the run (epoch x steps-per-epoch + step in the epoch);
a checkpoint's position is the number of steps done. The first flagged loss is measured on the weights the previous
step made, so that step's batch is a suspect too: a rollback goes to a checkpoint at or before it, and skips every
step from it (never before the checkpoint) through the step that triggered.

Exactness. Everything a rollback restores comes from the checkpoint, exactly as a fresh resume from it (main.py runs
the same code for both), and the guard's own window is part of the checkpoint, so a rolled-back run and a fresh run
resumed from that checkpoint with the same skip list take the same decisions and end bitwise equal.
"""
import argparse
import math
import os
import statistics
from collections import deque
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import utils
from utils import logger

MAD_TO_SIGMA = 1.4826  # MAD x this estimates the standard deviation of Gaussian noise
RELATIVE_FLOOR = 0.005  # the spread is taken as at least 0.5% of the median loss


def add_args(parser: argparse.ArgumentParser) -> None:
    """The guard's flags (main.py's parser)."""
    a = parser.add_argument
    a('--divergence-guard', action=argparse.BooleanOptionalAction, default=True,
      help='roll back to the newest checkpoint before a loss spike or a non-finite streak, skip the data window that '
           'led to it and go on (default on; see README "Long runs")')
    a('--guard-window', default=100, type=int,
      help='optimizer steps in the guard\'s robust reference (median and MAD of their losses); no decision before it '
           'is full')
    a('--guard-mads', default=8.0, type=float,
      help='a step is flagged when its loss exceeds the median by this many robust standard deviations')
    a('--guard-patience', default=3, type=int, help='flagged steps in a row that make a divergence')
    a('--max-rollbacks', default=3, type=int, help='stop, naming the steps, at a divergence after this many rollbacks')
    a('--rollback-lr-factor', default=1.0, type=float,
      help='multiply the peak learning rate by this at each rollback (1: keep it; recorded in the checkpoint)')


def check_args(args: argparse.Namespace, errors: List[str]) -> None:
    """Append a message naming each bad guard flag to ``errors``."""
    for flag in ('guard_window', 'guard_patience'):
        if getattr(args, flag) < 1:
            errors.append(f'--{flag.replace("_", "-")} must be >= 1, got {getattr(args, flag)}')
    if args.max_rollbacks < 0:
        errors.append(f'--max-rollbacks must be >= 0, got {args.max_rollbacks}')
    if not args.guard_mads > 0:
        errors.append(f'--guard-mads must be > 0, got {args.guard_mads}')
    if not 0 < args.rollback_lr_factor <= 1:
        errors.append(f'--rollback-lr-factor must be in (0, 1], got {args.rollback_lr_factor}')


class Divergence(Exception):
    """The run diverged: flagged global steps ``first`` .. ``last``."""

    def __init__(self, first: int, last: int, reason: str):
        super().__init__(f'{reason} at steps {first}-{last}')
        self.first, self.last, self.reason = first, last, reason


class DivergenceGuard:
    """Flags losses above a robust running reference; ``patience`` flagged steps in a row are a divergence.

    Args:
        window: accepted losses in the reference (median and MAD); no decision before it is full.
        mads: how many robust standard deviations above the median flag a step.
        patience: flagged steps in a row that make a divergence.
    """

    def __init__(self, window: int = 100, mads: float = 8.0, patience: int = 3):
        self.window, self.mads, self.patience = window, mads, patience
        self.losses: deque = deque(maxlen=window)
        self.first_high: Optional[int] = None  # the first of the flagged steps in a row, while there are some
        self.n_high = 0

    def threshold(self) -> Optional[float]:
        """The loss above which a step is flagged; None while the window fills."""
        if len(self.losses) < self.window:
            return None
        median = statistics.median(self.losses)
        mad = statistics.median(abs(x - median) for x in self.losses)
        return median + self.mads * max(MAD_TO_SIGMA * mad, RELATIVE_FLOOR * abs(median))

    def observe(self, step: int, loss: float) -> Optional[Tuple[int, int]]:
        """Take global step ``step``'s loss; returns (first, last) flagged steps when they make a divergence.

        Non-finite losses are the engine's (--max-nonfinite): they neither enter the reference nor break a run of
        flagged steps. Flagged losses stay out of the reference, so a spike cannot raise its own threshold.
        """
        if not math.isfinite(loss):
            return None
        limit = self.threshold()
        if limit is None or loss <= limit:
            self.first_high, self.n_high = None, 0
            self.losses.append(loss)
            return None
        self.first_high = step if self.first_high is None else self.first_high
        self.n_high += 1
        logger.warning('divergence guard: step %d loss %.4g above %.4g (%d of %d in a row)', step, loss, limit,
                       self.n_high, self.patience)
        return (self.first_high, step) if self.n_high >= self.patience else None

    def state_dict(self) -> Dict[str, Any]:
        return {'losses': list(self.losses), 'first_high': self.first_high, 'n_high': self.n_high}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.losses = deque((float(x) for x in state.get('losses', [])), maxlen=self.window)
        self.first_high, self.n_high = state.get('first_high'), int(state.get('n_high', 0))


def skip_windows(first: int, last: int, iters: int) -> List[List[int]]:
    """Global steps ``first`` .. ``last`` as [epoch, first step, last step] windows, one per epoch they touch."""
    windows = []
    while first <= last:
        epoch, step = divmod(first, iters)
        end = min(last, (epoch + 1) * iters - 1)
        windows.append([epoch, step, end - epoch * iters])
        first = end + 1
    return windows


class LongRun:
    """What a long run carries besides the weights: the guard, the skip list, the rollbacks and the lr scale.

    All of it is saved in every checkpoint (``state_dict``) and read back on resume, so a resumed run skips the same
    windows, applies the same lowered learning rate and keeps counting rollbacks towards ``--max-rollbacks``.
    """

    def __init__(self, args: argparse.Namespace):
        self.enabled = args.divergence_guard
        self.max_rollbacks, self.lr_factor = args.max_rollbacks, args.rollback_lr_factor
        self.guard = DivergenceGuard(args.guard_window, args.guard_mads, args.guard_patience)
        self.skips: List[List[int]] = []  # [epoch, first step, last step] (optimizer steps, within the epoch)
        self.rollbacks: List[Dict[str, Any]] = []
        self.lr_scale = 1.0

    def start(self, args: argparse.Namespace, engine, epoch: int, step: int, iters: int) -> None:
        """Where training starts, from scratch, on resume and after a rollback alike: the random streams from
        (seed, rank, position), so both roads to a position draw the same; the schedule with the lr scale."""
        seeds = np.random.SeedSequence([args.seed, args.rank, epoch, step]).generate_state(2)
        torch.manual_seed(int(seeds[0]))
        np.random.seed(int(seeds[1]))
        engine.set_schedule(utils.cosine_scheduler(args.lr * self.lr_scale, args.lr_end, args.epochs, iters,
                                                   args.warmup_epochs, args.lr_start))

    def skip(self, epoch: int):
        """``step -> bool`` for train_one_epoch: does the step fall in a skipped window of ``epoch``?"""
        windows = [(a, b) for e, a, b in self.skips if e == epoch]
        return (lambda step: any(a <= step <= b for a, b in windows)) if windows else None

    def observe(self, engine, global_step: int) -> None:
        """As each optimizer step's outcome is read (the engine's ``on_result``): raises Divergence when the guard
        sees one."""
        if self.enabled and engine.streak == 0:  # a non-finite step is the engine's (NonFiniteStreak)
            flagged = self.guard.observe(global_step, engine.last_loss)
            if flagged is not None:
                raise Divergence(*flagged, f'loss above the guard\'s threshold for {self.guard.patience} steps')

    def suspect_since(self, engine) -> Optional[int]:
        """The first step of a suspected divergence (flagged or non-finite steps in a row), or None: the checkpoint
        before it must survive the retention of kept checkpoints until the suspicion clears."""
        starts = [s for s in (self.guard.first_high, engine.streak_start if engine.streak else None) if s is not None]
        return min(starts) if starts and self.enabled else None

    def state_dict(self) -> Dict[str, Any]:
        return {'skip_steps': [list(w) for w in self.skips], 'rollbacks': [dict(r) for r in self.rollbacks],
                'lr_scale': self.lr_scale, 'guard': self.guard.state_dict()}

    def load_state_dict(self, ckpt: Dict[str, Any], history: bool = True) -> None:
        """Read a checkpoint's record. ``history=False`` (a rollback) keeps this run's skip list, rollbacks and lr
        scale, which are newer than any checkpoint's: only the guard's window comes from the checkpoint."""
        self.guard.load_state_dict(ckpt.get('guard') or {})
        if history:
            self.skips = [list(map(int, w)) for w in ckpt.get('skip_steps') or []]
            self.rollbacks = [dict(r) for r in ckpt.get('rollbacks') or []]
            self.lr_scale = float(ckpt.get('lr_scale', 1.0))

    def as_divergence(self, error: Exception) -> Divergence:
        """A new Divergence (no traceback: the aborted epoch's frames and data loader can go) from the guard's, or
        from the engine's non-finite streak when the guard is on; anything else (any error with the guard off) is
        raised again."""
        import engine as engine_lib
        if isinstance(error, Divergence):
            return Divergence(error.first, error.last, error.reason)
        if self.enabled and isinstance(error, engine_lib.NonFiniteStreak) and error.first is not None:
            return Divergence(error.first, error.last, f'{error.last - error.first + 1} non-finite losses in a row')
        raise error

    def check_budget(self, div: Divergence) -> None:
        """Stop, naming every divergence, when --max-rollbacks rollbacks are spent."""
        if len(self.rollbacks) < self.max_rollbacks:
            return
        past = ''.join(f'\n  rolled back: {r["reason"]} at steps {r["first"]}-{r["last"]}, to checkpoint epoch '
                       f'{r["to"][0]} step {r["to"][1]}' for r in self.rollbacks)
        raise SystemExit(f'divergence guard: {div.reason} at steps {div.first}-{div.last}, after '
                         f'{len(self.rollbacks)} rollbacks (--max-rollbacks {self.max_rollbacks}); stopping.{past}\n'
                         f'Lower --lr or pass --rollback-lr-factor, check the data of those steps, or resume with '
                         f'--no-divergence-guard.')

    def record(self, div: Divergence, to: Sequence[int], iters: int) -> Dict[str, Any]:
        """Record a rollback of ``div`` to the checkpoint at (epoch, step) ``to``: skip from the step before the
        first flagged one (or the checkpoint, whichever is later) through the last, and scale the lr."""
        first = max(div.first - 1, to[0] * iters + to[1])
        windows = skip_windows(first, div.last, iters)
        self.skips.extend(windows)
        self.lr_scale *= self.lr_factor
        entry = {'reason': div.reason, 'first': div.first, 'last': div.last, 'to': [int(to[0]), int(to[1])],
                 'skip_steps': windows, 'lr_scale': self.lr_scale}
        self.rollbacks.append(entry)
        logger.warning('divergence guard: %s at steps %d-%d; rolling back to epoch %d step %d, skipping %s%s',
                       div.reason, div.first, div.last, to[0], to[1],
                       ', '.join(f'epoch {e} steps {a}-{b}' for e, a, b in windows),
                       f', peak lr x{self.lr_scale:g}' if self.lr_scale != 1 else '')
        return entry


    def rollback_target(self, manager, div: Divergence, iters: int, error: str) -> str:
        """The checkpoint to roll ``div`` back to, once the write in flight is done and if rollbacks remain.

        Raises:
            SystemExit: after --max-rollbacks rollbacks. RuntimeError: no checkpoint predates the divergence.
        """
        manager.wait()
        self.check_budget(div)
        target = choose_checkpoint(manager.kept(), div, iters)
        if target is None:
            raise RuntimeError(f'divergence guard: {div}, and no checkpoint taken before step {div.first - 1} to '
                               f'roll back to (save more often with --save-every-steps): {error}')
        utils.barrier()  # rank 0 wrote it: every rank may read it now
        return target[2]

    def log_rollback(self, entry: Dict[str, Any], seconds: float, output_dir: str) -> None:
        """Report a rollback done in ``seconds``, in the console and as a line of log.txt."""
        entry['reload_seconds'] = round(seconds, 3)
        logger.warning('divergence guard: rolled back in %.2f s (rollback %d of at most %d)', seconds,
                       len(self.rollbacks), self.max_rollbacks)
        if utils.is_main_process():
            utils.append_json_line(os.path.join(output_dir, 'log.txt'), {'rollback': entry, 'epoch': entry['to'][0]})


def choose_checkpoint(candidates: Sequence[Tuple[int, int, str]], div: Divergence,
                      iters: int) -> Optional[Tuple[int, int, str]]:
    """The newest (epoch, step, path) taken at or before the step preceding the first flagged one, decided on rank
    0 (which wrote them) and sent to every rank, so all load the same file."""
    limit = div.first - 1
    fit = [c for c in candidates if c[0] * iters + c[1] <= limit]
    choice = [max(fit) if fit else None]
    if utils.get_world_size() > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice[0]
