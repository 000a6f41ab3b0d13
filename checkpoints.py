"""Checkpoint files: the safe loader, the one atomic writer, verified writes, and the kept checkpoints of long runs
saved off the training's critical path. Of the project it imports staging.py only (utils.py re-exports its loader).

Loading: ``torch.load(weights_only=True)`` under an allow-list, so no file runs code; our files and the released SLIP
ones (DDP ``module.`` keys, legacy model names) come back as one plain dict. Writing: every file the project writes
whole goes through ``atomic_write`` (collision-proof temporary file beside the target, fsync, rename): a kill at any
moment leaves the old file or the new one. Checkpoints go through ``write_verified`` on top of it (read back: size,
sha256, ``torch.load``, before the rename); ``save_checkpoint`` is main_linear.py's and fine-tuning's funnel.

Files in ``--output-dir`` (main.py, ``CheckpointManager``):
  checkpoint_e{E}_s{S}.pt   the kept checkpoints, S optimizer steps of epoch E done (an epoch's end is e{E+1}_s0)
  checkpoint.pt             the newest of them, a hard link (no extra space): what a restart resumes from
  checkpoint_best.pt        the best zero-shot one, a hard link too

A save copies the state into host buffers reserved before training (``CheckpointManager.reserve``, staging.py; pinned
for CUDA tensors, whose copies go on a side stream: the training thread only enqueues them), then a background thread
writes and verifies the file. Only then is ``checkpoint.pt`` pointed at it and are the older ones deleted: all but the
``--keep-checkpoints`` newest, except those of every ``--save-every-epochs``-th epoch and the one a suspected
divergence may roll back to (guard.py). Numbered checkpoints newer than the one written belong to a branch the run
left (a rollback, or a resume from an older file) and are deleted with them. The next save, a rollback and the end of
training wait for the write in flight; a failed write stops the run there. A kill at any moment leaves every complete
checkpoint usable. This is torch.distributed.checkpoint's async_save in spirit, kept to one ``torch.save`` file.
"""
import argparse
import contextlib
import hashlib
import logging
import os
import pathlib
import re
import secrets
import shutil
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from staging import HostStaging, host_copy, state_like  # noqa: F401 (checkpoints.host_copy, .state_like as before)

logger = logging.getLogger('slip')  # the project's logger (utils.logger)

_NAME = re.compile(r'^checkpoint_e(\d+)_s(\d+)\.pt$')
_TEMPORARY = re.compile(r'\.tmp\.\d+(\.[0-9a-f]+)?$')  # atomic_write's <pid>.<token> (<pid> alone before issue 25)
KILL_AFTER_BYTES = 1 << 16  # kill-during-save fires once this much of the temporary file is written
_CHUNK = 1 << 24


def _is_main_process() -> bool:
    """Rank 0, or no process group (utils.is_main_process, which this module cannot import: utils imports it)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def add_args(parser: argparse.ArgumentParser) -> None:
    """The checkpoint flags (main.py's parser)."""
    a = parser.add_argument
    a('--keep-checkpoints', default=2, type=int,
      help='numbered checkpoints kept (checkpoint_e{epoch}_s{step}.pt; checkpoint.pt links the newest): older ones '
           'are deleted once a new one is written and verified')
    a('--save-every-epochs', default=0, type=int,
      help='also keep the end-of-epoch checkpoint of every N-th epoch for good (0: none)')
    a('--async-save', action=argparse.BooleanOptionalAction, default=True,
      help='write checkpoints in a background thread from a host copy, so training goes on during the write')


def check_args(args: argparse.Namespace, errors: List[str]) -> None:
    if args.keep_checkpoints < 1:
        errors.append(f'--keep-checkpoints must be >= 1 (the newest is checkpoint.pt), got {args.keep_checkpoints}')
    if args.save_every_epochs < 0:
        errors.append(f'--save-every-epochs must be >= 0, got {args.save_every_epochs}')


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, unsafe, or does not fit the model."""


# Objects that released SLIP checkpoints pickle besides tensors: the argparse Namespace of the run and, for runs
# launched by submitit, pathlib paths inside it. Nothing else is ever unpickled.
# The function numpy pickles a scalar with (numpy._core.multiarray.scalar), reached through the public pickle protocol
# rather than numpy's private module path, which moved between numpy 1 and 2.
NUMPY_SCALAR = np.float64(0).__reduce__()[0]
SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                pathlib.PureWindowsPath, np.dtype, NUMPY_SCALAR, type(np.dtype(np.float64))]
# Early released checkpoints store SLIP under its pre-release name in args.model (SLIP issue #3).
LEGACY_PREFIXES = {'CLIP_SIMCLR_': 'SLIP_'}


def _plain(value: Any) -> Any:
    """Arguments as JSON-like primitives, so new checkpoints load with weights_only=True."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def args_to_dict(args: Any) -> Dict[str, Any]:
    if args is None:
        return {}
    return _plain(dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args))


def strip_prefix(state_dict: Dict[str, torch.Tensor], prefix: str = 'module.') -> Dict[str, torch.Tensor]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def current_model_name(name: str) -> str:
    """A model name with a legacy prefix (``CLIP_SIMCLR_*``) replaced by today's (``SLIP_*``); others unchanged."""
    for old, new in LEGACY_PREFIXES.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def load_checkpoint(path: str, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Load a local checkpoint file of ours or a released SLIP one, safely, as a plain dict.

    Under ``torch.load(weights_only=True)`` with an allow-list (Namespace, pathlib paths): no arbitrary object is
    ever unpickled. The result has ``state_dict`` without the DDP ``module.`` prefix, ``args`` as a dict and the
    legacy model name ``CLIP_SIMCLR_*`` mapped to ``SLIP_*``. A released name or an http(s) URL is first turned
    into a local file by ``zoo.load_checkpoint``, which then calls this.

    Raises:
        CheckpointError: naming the file when it is missing, truncated, not a checkpoint or holds unsafe objects.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist')
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign / unsafe files
        raise CheckpointError(f'cannot load checkpoint {path!r}: it is truncated, not a PyTorch checkpoint, or '
                              f'holds objects outside the allow-list ({type(e).__name__}: {str(e)[:300]})') from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'checkpoint {path!r} holds a {type(ckpt).__name__}, expected a dict')
    ckpt = dict(ckpt)
    if 'state_dict' not in ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        ckpt = {'state_dict': ckpt}  # a bare state_dict
    for alias in ('model', 'module'):  # BEiT / MAE / DeiT files keep their weights under these keys
        if 'state_dict' not in ckpt and isinstance(ckpt.get(alias), dict):
            ckpt['state_dict'] = ckpt[alias]
    if 'state_dict' not in ckpt:
        raise CheckpointError(f'checkpoint {path!r} has no "state_dict" (keys: {sorted(ckpt)[:10]})')
    ckpt['state_dict'] = strip_prefix(ckpt['state_dict'])
    ckpt['args'] = args_to_dict(ckpt.get('args'))
    if isinstance(ckpt['args'].get('model'), str):
        ckpt['args']['model'] = current_model_name(ckpt['args']['model'])
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# Writing: one atomic writer, verified checkpoints
# ----------------------------------------------------------------------------------------------------------------
class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written, or did not read back as written."""


@contextlib.contextmanager
def atomic_write(path: str, text: bool = False, link_to: Optional[str] = None) -> Iterator[Any]:
    """Replace ``path`` all at once by what the body writes: ``with atomic_write(path) as f: f.write(data)``.

    ``f`` is a temporary file beside ``path``, ``<path>.tmp.<pid>.<random token>``, created exclusively (O_EXCL), so
    that two writers (threads or processes) never share one; it is binary, or text with ``text``, and ``f.name`` is
    its path for writers that take a path. When the body returns, the file is flushed, fsynced and renamed onto
    ``path`` (atomic on POSIX), then the folder is fsynced. When the body raises, an interruption included, the
    temporary file is removed and ``path`` is left as it was. With ``link_to``, the temporary file is a hard link to
    that file (a copy where the file system has none) and ``f`` is None: ``path`` then names the same bytes.
    """
    path = os.fspath(path)
    tmp = f'{path}.tmp.{os.getpid()}.{secrets.token_hex(6)}'
    created = False
    try:
        if link_to is None:
            with open(tmp, 'x' if text else 'xb') as f:
                created = True
                yield f
                f.flush()
                os.fsync(f.fileno())
        else:
            try:
                os.link(link_to, tmp)
                created = True
            except OSError:  # no hard links on this file system: a copy
                with open(link_to, 'rb') as src, open(tmp, 'xb') as dst:
                    created = True
                    shutil.copyfileobj(src, dst, _CHUNK)
                    dst.flush()
                    os.fsync(dst.fileno())
            yield None
        os.replace(tmp, path)
    except BaseException:
        if created and os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(folder: str) -> None:
    """Make a rename durable (the directory entry), where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def link(src: str, dst: str) -> None:
    """Point ``dst`` at ``src``'s file atomically: a hard link, or a copy where the file system has none."""
    with atomic_write(dst, link_to=src):
        pass


class _HashingFile:
    """What torch.save writes through: counts and hashes the bytes on their way to the file."""

    def __init__(self, f, kill_after: Optional[int] = None):
        self.f, self.kill_after = f, kill_after
        self.sha, self.size = hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        n = self.f.write(data)
        if self.kill_after is not None and self.size >= self.kill_after:  # fault injection: die mid-write
            self.f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    def flush(self) -> None:
        self.f.flush()


def write_verified(state: Dict[str, Any], path: str, kill_after: Optional[int] = None) -> Tuple[int, str]:
    """Write ``state`` to ``path`` atomically and verified; returns (bytes, sha256).

    The file is written by ``atomic_write``, fsynced and dropped from the page cache, read back (its size and sha256
    must match what was written, and torch.load(weights_only=True) must open it), and only then renamed to ``path``.
    Any failure, an interruption included, removes the temporary file and leaves ``path`` as it was.

    Raises:
        CheckpointWriteError: naming the file, when the read-back differs from what was written.
    """
    with atomic_write(path) as f:
        out = _HashingFile(f, kill_after)
        torch.save(state, out)
        f.flush()
        os.fsync(f.fileno())
        if hasattr(os, 'posix_fadvise'):  # read back from the disk, not from the page cache
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        verify(f.name, out.size, out.sha.hexdigest())
    return out.size, out.sha.hexdigest()


def verify(path: str, size: int, sha256: str) -> None:
    """Check that ``path`` holds ``size`` bytes hashing to ``sha256`` and opens with torch.load(weights_only=True)
    under ``load_checkpoint``'s allow-list."""
    actual = os.path.getsize(path)
    if actual != size:
        raise CheckpointWriteError(f'checkpoint {path}: {actual} bytes on disk, {size} written')
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            digest.update(chunk)
    if digest.hexdigest() != sha256:
        raise CheckpointWriteError(f'checkpoint {path}: the bytes read back differ from those written (sha256)')
    try:  # mmap: the format and the pickle are checked, the tensor bytes were by the hash
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointWriteError(f'checkpoint {path} does not load with weights_only=True: {e}') from e


def save_checkpoint(state: Dict[str, Any], is_best: bool, output_dir: str, filename: str = 'checkpoint.pt',
                    best_filename: str = 'checkpoint_best.pt') -> Optional[str]:
    """Write ``output_dir/filename`` verified (``write_verified``) on rank 0; returns its path (None on other ranks).

    With ``is_best``, ``best_filename`` names the same file too (a hard link, no second copy). ``args`` are stored as
    plain values, so that the file loads with weights_only=True. A kill at any moment leaves the previous complete file
    or the new complete file, never a partial one.
    """
    if not _is_main_process():
        return None
    state = dict(state)
    if 'args' in state:
        state['args'] = args_to_dict(state['args'])
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, filename)
    write_verified(state, path)
    if is_best:
        link(path, os.path.join(output_dir, best_filename))
    return path


# ----------------------------------------------------------------------------------------------------------------
# The kept checkpoints of a run
# ----------------------------------------------------------------------------------------------------------------
class CheckpointManager:
    """Numbered, verified, kept checkpoints in ``output_dir``, written in the background (see the module docstring).

    Args:
        output_dir: the run's folder.
        keep: numbered checkpoints kept (>= 1; the newest is also ``checkpoint.pt``).
        every_epochs: the end-of-epoch checkpoints of epochs that are multiples of this are kept too (0: none).
        async_save: write from a host copy in a background thread (else in the calling thread).
        kill_fault: ``(epoch, step) -> bool``, fault injection: SIGKILL while writing that checkpoint.
    """

    def __init__(self, output_dir: str, keep: int = 2, every_epochs: int = 0, async_save: bool = True,
                 kill_fault: Optional[Callable[[int, int], bool]] = None):
        self.dir, self.keep, self.every, self.async_save = output_dir, keep, every_epochs, async_save
        self.kill_fault = kill_fault
        self._thread: Optional[threading.Thread] = None
        self._done = threading.Event()
        self._error: Optional[BaseException] = None
        self._staging = HostStaging()
        self.stalls: List[float] = []  # seconds the training thread waited, per save
        if _is_main_process() and os.path.isdir(output_dir):
            for name in os.listdir(output_dir):  # temporary files of a writer that was killed
                if name.startswith('checkpoint') and _TEMPORARY.search(name):
                    os.remove(os.path.join(output_dir, name))

    def reserve(self, state: Any) -> None:
        """Allocate the host buffers of the background saves now, before training, for the tensors of ``state``
        (``state_like(model, optimizer)``; pinned for CUDA tensors): every save copies into them. Only rank 0
        writes, so only it allocates; saves in the training thread need none."""
        if self.async_save and _is_main_process():
            t = time.perf_counter()
            size = self._staging.reserve(state)
            logger.info('checkpoints: %.1f MB of host buffers reserved in %.2f s', size / 2**20,
                        time.perf_counter() - t)

    def host_buffers(self) -> List[torch.Tensor]:
        """The host buffers the background saves copy into."""
        return self._staging.buffers()

    def save(self, state: Dict[str, Any], is_best: bool = False, protect: Optional[Tuple[int, int]] = None) -> None:
        """Save ``state`` (its ``epoch`` and ``step`` name it); every rank calls it, rank 0 writes.

        ``protect`` (epoch, step): the newest checkpoint at or before it is kept whatever ``keep`` says.
        """
        t = time.perf_counter()
        self.wait()  # the previous write is done: its buffers may be overwritten
        if not _is_main_process():
            return
        state = dict(state, args=args_to_dict(state.get('args')))
        if self.async_save:
            staged, copied = self._stage(state)
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._write, args=([staged, copied, is_best, protect], self._done),
                                            daemon=False, name='checkpoint-writer')
            self._thread.start()
        else:
            self.commit(state, is_best, protect)
        self.stalls.append(time.perf_counter() - t)

    def _stage(self, state: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[Any]]:
        """``state`` in the host buffers, and the CUDA event its copies are done at (staging.py; None on CPU)."""
        extra = self._staging.reserve(state)
        if extra:
            logger.info('checkpoints: %.1f MB of host buffers allocated at this save (not reserved)', extra / 2**20)
        return self._staging.copy(state)

    def _write(self, job: List, done: threading.Event) -> None:
        """The writer thread: ``job`` is [state, copied, is_best, protect] (``copied``: the CUDA event or None)."""
        try:
            state, copied, is_best, protect = job
            if copied is not None:
                copied.synchronize()  # the device-to-host copies have landed in the buffers
            self.commit(state, is_best, protect)
        except BaseException as e:  # reported by the next wait(), in the training thread
            self._error = e
        finally:
            state = copied = None
            job.clear()  # the thread lets go of the host copy before it says it is done (see wait)
            done.set()

    def wait(self) -> None:
        """Wait for the write in flight. Raises CheckpointWriteError when it failed."""
        if self._thread is not None:
            # The event, not Thread.join, takes an exception raised by a signal handler while the training thread
            # waits (submitit's requeue, Ctrl-C): on Python < 3.13 one raised inside join() marks the running thread
            # stopped, the interpreter then finalizes under it, and its freeing of tensors aborts the process
            # ('terminate called without an active exception'). After the event the thread holds nothing.
            self._done.wait()
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointWriteError(f'writing a checkpoint in {self.dir} failed: {error}') from error

    def commit(self, state: Dict[str, Any], is_best: bool = False, protect: Optional[Tuple[int, int]] = None) -> None:
        """Write, verify and link one checkpoint, then apply the retention (the writer thread runs this)."""
        epoch, step = int(state['epoch']), int(state.get('step', 0))
        path = os.path.join(self.dir, f'checkpoint_e{epoch}_s{step}.pt')
        kill = KILL_AFTER_BYTES if self.kill_fault is not None and self.kill_fault(epoch, step) else None
        t = time.perf_counter()
        os.makedirs(self.dir, exist_ok=True)
        size, _ = write_verified(state, path, kill)
        link(path, os.path.join(self.dir, 'checkpoint.pt'))
        if is_best:
            link(path, os.path.join(self.dir, 'checkpoint_best.pt'))
        self._retain((epoch, step), protect)
        logger.info('checkpoint epoch %d step %d: %.1f MB written and verified in %.2f s', epoch, step, size / 2**20,
                    time.perf_counter() - t)

    def kept(self) -> List[Tuple[int, int, str]]:
        """The numbered checkpoints on disk as (epoch, step, path), oldest first."""
        if not os.path.isdir(self.dir):
            return []
        found = [(int(m[1]), int(m[2]), os.path.join(self.dir, m[0]))
                 for m in map(_NAME.match, os.listdir(self.dir)) if m]
        return sorted(found)

    def _retain(self, newest: Tuple[int, int], protect: Optional[Tuple[int, int]]) -> None:
        files = self.kept()
        keep = {f for f in files if f[:2] <= newest}
        ordered = sorted(keep)
        keep = set(ordered[-self.keep:])
        keep |= {f for f in ordered if self.every and f[1] == 0 and f[0] % self.every == 0}
        before = [f for f in ordered if protect is not None and f[:2] <= protect]
        keep |= set(before[-1:])
        for f in files:
            if f not in keep:
                os.remove(f[2])

    def close(self) -> None:
        """Wait for the last write (the end of training, or on the way out of an error)."""
        self.wait()
        if self.stalls and _is_main_process():
            logger.info('checkpoints: training waited %.3f s per save on average (%d saves, %s)',
                        sum(self.stalls) / len(self.stalls), len(self.stalls),
                        'written in the background' if self.async_save else 'written in the training thread')
