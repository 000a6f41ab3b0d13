"""Progress lines for the long jobs: done/total, rate and ETA, every so often and at the end, on rank 0 only.

Slurm writes a job's output to a file, so progress is a plain line now and then in the style of pre-training's
lines (engine._report), never a redrawn bar::

    imagenet [12,800/50,000 images]  412 images/s  ETA 0:01:55
    make_dataset [2,000,000 lines]  35,100 lines/s  1.2 GB of 54.3 GB (2.2%)  ETA 0:42:10  kept 301,222

A line is printed at most every ``interval`` seconds (default: the ``SLIP_PROGRESS_SECONDS`` environment variable,
else 30) and once at the end. The ETA comes from ``total`` (units known in advance) or, for a file read line by line,
from ``size`` and ``position`` (bytes read of the file's size). Used as a context manager, a job that fails part-way
says how far it got (on every rank, as a warning); otherwise ranks other than 0 print nothing.

``Writers`` sends pre-training's scalars to TensorBoard and W&B.
"""
import os
import time
from typing import Any, Callable, Dict, Optional

import utils
from utils import logger

INTERVAL_ENV = 'SLIP_PROGRESS_SECONDS'
DEFAULT_INTERVAL = 30.0


def rate(done: float, elapsed: float) -> float:
    """Units per second so far."""
    return done / max(elapsed, 1e-9)


def eta(done: float, left: float, elapsed: float) -> float:
    """Seconds the ``left`` units will take at the rate so far (infinite before the first unit is done)."""
    return elapsed / done * left if done > 0 else float('inf')


def format_eta(seconds: float) -> str:
    """H:MM:SS, or '?' for an ETA not known yet."""
    return utils.format_seconds(seconds) if seconds != float('inf') else '?'


def _count(n: float) -> str:
    return f'{n:,.0f}' if n >= 100 or float(n).is_integer() else f'{n:,.1f}'


def _bytes(n: float) -> str:
    for unit, scale in (('GB', 2 ** 30), ('MB', 2 ** 20), ('KB', 2 ** 10)):
        if n >= scale:
            return f'{n / scale:.1f} {unit}'
    return f'{n:.0f} B'


def _interval() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    try:
        return DEFAULT_INTERVAL if raw is None else max(0.0, float(raw))
    except ValueError as e:
        raise ValueError(f'{INTERVAL_ENV}={raw!r}: expected a number of seconds') from e


class Progress:
    """Counts the units of one job and prints a progress line at most every ``interval`` seconds and at the end.

    Args:
        what: the job's name, the line's first word(s) (``imagenet``, ``make_dataset``).
        total: units the job has, when known (``[done/total unit]`` and the ETA).
        unit: what is counted (``images``, ``lines``, ``records``).
        size: bytes of the input read as the job goes; with ``position`` (a callable giving the bytes read so far,
            called only when a line is printed) the line shows ``read of size`` and the ETA comes from them.
        interval: seconds between lines (None: ``SLIP_PROGRESS_SECONDS``, else 30); 0 prints on every update.
        clock: seconds, monotonic (injectable for tests).
        log: where lines go (default: the ``slip`` logger, INFO; the failure line at WARNING).
        rank: this process's rank (default: utils.get_rank()); only rank 0 prints progress.
    """

    def __init__(self, what: str, total: Optional[int] = None, unit: str = 'items', *, size: Optional[int] = None,
                 position: Optional[Callable[[], int]] = None, interval: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, log: Optional[Callable[[str], Any]] = None,
                 rank: Optional[int] = None):
        self.what, self.total, self.unit, self.size, self.position = what, total, unit, size, position
        self.interval = _interval() if interval is None else interval
        self.clock, self.log, self.fail_log = clock, log or logger.info, log or logger.warning
        self.rank = utils.get_rank() if rank is None else rank
        self.done, self.fields = 0, {}  # fields: extra counts shown at the end of the line (kept 301,222)
        self.start = self.last = clock()
        self.finished = False

    # -- counting --------------------------------------------------------------------------------------------
    def update(self, n: int = 1, **fields: Any) -> None:
        """``n`` more units done (and ``fields`` to show); prints a line when ``interval`` seconds have passed."""
        self.done += n
        if fields:
            self.fields.update(fields)
        if self.rank == 0 and (self.total is None or self.done < self.total):  # the last one is finish()'s
            now = self.clock()
            if now - self.last >= self.interval:
                self.last = now
                self.log(self.line(now))

    def finish(self, **fields: Any) -> None:
        """Print the end line (once): units done, the time taken and the mean rate."""
        self.fields.update(fields)
        if self.finished:
            return
        self.finished = True
        if self.rank == 0:
            elapsed = self.clock() - self.start
            read = f'  {self._read()}' if self.size is not None else ''
            self.log(f'{self.what} [{self._done()}]  done in {utils.format_seconds(elapsed)}  '
                     f'{_count(rate(self.done, elapsed))} {self.unit}/s{read}{self._fields()}')

    def __enter__(self) -> 'Progress':
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or self.finished:  # an error after finish() is not this job's to report
            self.finish()
            return
        self.finished = True
        where = f' (rank {self.rank})' if self.rank else ''
        elapsed = utils.format_seconds(self.clock() - self.start)
        read = f', {self._read()}' if self.size is not None else ''
        self.fail_log(f'{self.what}{where}: stopped by {exc_type.__name__} at [{self._done()}]{read} after '
                      f'{elapsed}{self._fields()}')

    # -- the line --------------------------------------------------------------------------------------------
    def _done(self) -> str:
        total = f'/{_count(self.total)}' if self.total is not None else ''
        return f'{_count(self.done)}{total} {self.unit}'

    def _read(self) -> str:
        pos = self.position() if self.position is not None else 0
        share = f' ({100 * pos / self.size:.1f}%)' if self.size else ''
        return f'{_bytes(pos)} of {_bytes(self.size)}{share}'

    def _fields(self) -> str:
        return ''.join(f'  {k} {_count(v) if isinstance(v, (int, float)) else v}' for k, v in self.fields.items())

    def seconds_left(self, now: float) -> float:
        """The ETA: from bytes read of ``size`` when given, else from ``done`` of ``total`` (inf when unknown)."""
        elapsed = now - self.start
        if self.size is not None and self.position is not None:
            pos = self.position()
            return eta(pos, self.size - pos, elapsed)
        if self.total is not None:
            return eta(self.done, self.total - self.done, elapsed)
        return float('inf')

    def line(self, now: Optional[float] = None) -> str:
        now = self.clock() if now is None else now
        read = f'  {self._read()}' if self.size is not None else ''
        return (f'{self.what} [{self._done()}]  {_count(rate(self.done, now - self.start))} {self.unit}/s{read}  '
                f'ETA {format_eta(self.seconds_left(now))}{self._fields()}')


class Writers:
    """TensorBoard (always, rank 0) and W&B (only with --wandb) behind one small interface.

    Every scalar is logged at one monotonic step, the number of optimizer steps done, so W&B keeps them all (it
    drops values logged at a smaller step than one it has seen).
    """

    def __init__(self, args):
        self.tb = self.wandb = None
        if not utils.is_main_process():
            return
        from torch.utils.tensorboard import SummaryWriter
        self.tb = SummaryWriter(os.path.join(args.output_dir, 'tensorboard'))
        if args.wandb:
            import wandb
            self.wandb = wandb
            wandb.init(project='slip', id=os.path.basename(os.path.normpath(args.output_dir)),
                       config=utils.args_to_dict(args), resume='allow')

    def scalars(self, values: Dict[str, float], step: int, prefix: str = '') -> None:
        values = {prefix + k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self.tb is None:
            return
        for name, v in values.items():
            self.tb.add_scalar(name, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
