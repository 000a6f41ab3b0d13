"""Checkpoints of long runs: verified atomic writes, the last K kept, and saves off the training's critical path.

Files in ``--output-dir`` (main.py):
  checkpoint_e{E}_s{S}.pt   the kept checkpoints, S optimizer steps of epoch E done (an epoch's end is e{E+1}_s0)
  checkpoint.pt             the newest of them, a hard link (no extra space): what a restart resumes from
  checkpoint_best.pt        the best zero-shot one, a hard link too

A save copies the state to host memory (the only part the training thread waits for; pinned buffers, reused from
save to save), then a background thread writes it to a temporary file while computing its sha256, fsyncs it, reads it
back from the disk (size, sha256, and ``torch.load(weights_only=True)`` opens it), and renames it into place. Only
then is ``checkpoint.pt`` pointed at it and are the older ones deleted: all but the ``--keep-checkpoints`` newest,
except those of every ``--save-every-epochs``-th epoch and the one a suspected divergence may roll back to (guard.py).
Numbered checkpoints newer than the one written belong to a branch the run left (a rollback, or a resume from an older
file) and are deleted with them. The next save, a rollback and the end of training wait for the write in flight; a
failed write stops the run at that point. A kill at any moment leaves every complete checkpoint usable.

This is torch.distributed.checkpoint's async_save in spirit (host staging, then a background write), kept to one
``torch.save`` file per run so that ``utils.load_checkpoint`` and the released tools read it unchanged.
"""
import argparse
import hashlib
import os
import re
import shutil
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import utils
from utils import logger

_NAME = re.compile(r'^checkpoint_e(\d+)_s(\d+)\.pt$')
_TEMPORARY = re.compile(r'\.tmp\.\d+$')
KILL_AFTER_BYTES = 1 << 16  # kill-during-save fires once this much of the temporary file is written
_CHUNK = 1 << 24


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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written, or did not read back as written."""


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

    The file is written under a temporary name, fsynced and dropped from the page cache, read back (its size and
    sha256 must match what was written, and torch.load(weights_only=True) must open it), and only then renamed to
    ``path``. Any failure, an interruption included, removes the temporary file and leaves ``path`` as it was.

    Raises:
        CheckpointWriteError: naming the file, when the read-back differs from what was written.
    """
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            out = _HashingFile(f, kill_after)
            torch.save(state, out)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, 'posix_fadvise'):  # read back from the disk, not from the page cache
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        verify(tmp, out.size, out.sha.hexdigest())
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return out.size, out.sha.hexdigest()


def verify(path: str, size: int, sha256: str) -> None:
    """Check that ``path`` holds ``size`` bytes hashing to ``sha256`` and opens with torch.load(weights_only=True)."""
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
        torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointWriteError(f'checkpoint {path} does not load with weights_only=True: {e}') from e


def _fsync_dir(folder: str) -> None:
    """Make a rename durable (the directory entry), where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def link(src: str, dst: str) -> None:
    """Point ``dst`` at ``src``'s file atomically: a hard link, or a copy where the file system has none."""
    tmp = f'{dst}.tmp.{os.getpid()}'
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def host_copy(obj: Any, cache: Optional[Dict] = None, key: Tuple = ()) -> Any:
    """``obj`` with every tensor copied to host memory (pinned for device tensors), reusing ``cache``'s buffers.

    On CPU the tensors must be copied too: training updates them in place while the background write reads them.
    """
    if torch.is_tensor(obj):
        buf = None if cache is None else cache.get(key)
        if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
            buf = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
            if cache is not None:
                cache[key] = buf
        return buf.copy_(obj.detach(), non_blocking=obj.is_cuda)
    if isinstance(obj, dict):
        return {k: host_copy(v, cache, key + (k,)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v, cache, key + (i,)) for i, v in enumerate(obj))
    return obj  # numbers, strings, None: immutable


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
        self._cache: Dict = {}
        self.stalls: List[float] = []  # seconds the training thread waited, per save
        if utils.is_main_process() and os.path.isdir(output_dir):
            for name in os.listdir(output_dir):  # temporary files of a writer that was killed
                if name.startswith('checkpoint') and _TEMPORARY.search(name):
                    os.remove(os.path.join(output_dir, name))

    def save(self, state: Dict[str, Any], is_best: bool = False, protect: Optional[Tuple[int, int]] = None) -> None:
        """Save ``state`` (its ``epoch`` and ``step`` name it); every rank calls it, rank 0 writes.

        ``protect`` (epoch, step): the newest checkpoint at or before it is kept whatever ``keep`` says.
        """
        t = time.perf_counter()
        self.wait()
        if not utils.is_main_process():
            return
        state = dict(state, args=utils.args_to_dict(state.get('args')))
        if self.async_save:
            state = host_copy(state, self._cache)
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # the device-to-host copies are complete before the writer reads them
            self._done = threading.Event()
            self._thread = threading.Thread(target=self._write, args=([state, is_best, protect], self._done),
                                            daemon=False, name='checkpoint-writer')
            self._thread.start()
        else:
            self.commit(state, is_best, protect)
        self.stalls.append(time.perf_counter() - t)

    def _write(self, job: List, done: threading.Event) -> None:
        try:
            self.commit(*job)
        except BaseException as e:  # reported by the next wait(), in the training thread
            self._error = e
        finally:
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
        if self.stalls and utils.is_main_process():
            logger.info('checkpoints: training waited %.3f s per save on average (%d saves, %s)',
                        sum(self.stalls) / len(self.stalls), len(self.stalls),
                        'written in the background' if self.async_save else 'written in the training thread')
