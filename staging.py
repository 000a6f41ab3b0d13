"""Host copies of a training state for background checkpoint saves (checkpoints.py): buffers reserved once, before
training, and copies that do not stop the training thread.

The buffers are pooled by dtype, shape and device kind, so a save takes, for each tensor of its state in order, the next
buffer of that kind: whatever the state's nesting, a state like the reserved one allocates nothing. Buffers of CUDA
tensors are pinned, and their copies are enqueued on a side stream after the work queued so far (the steps that wrote
the tensors); the calling thread does not wait for them (no synchronize), the writer waits for their event, and the
training stream waits for them on the device, so that the next steps update the tensors in place only after they were
read (and memory freed meanwhile is handed out again only after the copies).
"""
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch


def _map(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with ``fn`` applied to every tensor in it, in a fixed order (dicts, lists, tuples rebuilt)."""
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    return obj  # numbers, strings, None: immutable


def _tensors(obj: Any) -> List[torch.Tensor]:
    found: List[torch.Tensor] = []
    _map(obj, found.append)
    return found


def _kind(t: torch.Tensor) -> Tuple[torch.dtype, Tuple[int, ...], bool]:
    return t.dtype, tuple(t.shape), t.is_cuda


def reserve_host_buffers(obj: Any, cache: Dict) -> int:
    """Allocate what ``cache`` lacks for a host copy of ``obj``: a buffer per tensor, by dtype, shape and whether the
    tensor is on CUDA (its buffer is pinned then; others are written once now, so that the first save does not fault
    their pages in). Returns the bytes allocated."""
    allocated = 0
    for (dtype, shape, pin), n in Counter(map(_kind, _tensors(obj))).items():
        have = cache.setdefault((dtype, shape, pin), [])
        while len(have) < n:
            have.append(torch.empty(shape, dtype=dtype, pin_memory=pin) if pin else torch.zeros(shape, dtype=dtype))
            allocated += have[-1].nbytes
    return allocated


def host_copy(obj: Any, cache: Optional[Dict] = None) -> Any:
    """``obj`` with every tensor copied into a host buffer of ``cache`` (``reserve_host_buffers``; what it lacks is
    allocated now). CUDA tensors are copied without blocking, on the current stream: the caller orders the copies.

    On CPU the tensors must be copied too: training updates them in place while the background write reads them.
    """
    cache = {} if cache is None else cache
    reserve_host_buffers(obj, cache)
    taken: Counter = Counter()

    def copy(t: torch.Tensor) -> torch.Tensor:
        kind = _kind(t)
        taken[kind] += 1
        return cache[kind][taken[kind] - 1].copy_(t.detach(), non_blocking=t.is_cuda)
    return _map(obj, copy)


def state_like(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    """Tensors like those of a checkpoint of ``model`` and ``optimizer`` once training has stepped, for
    ``CheckpointManager.reserve`` before the first step: the model's state and the optimizer's. Adam(W) creates its
    state at the first step: a parameter without state counts two moments like it and a step counter (on the
    parameter's device when the optimizer is fused or capturable, as torch keeps it)."""
    tensors, counters = list(model.state_dict().values()), {}
    for group in optimizer.param_groups:
        for p in group['params']:
            state = optimizer.state.get(p)
            if state:
                tensors += _tensors(dict(state))
            elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                device = p.device if group.get('fused') or group.get('capturable') else torch.device('cpu')
                if device not in counters:
                    counters[device] = torch.zeros((), dtype=torch.float32, device=device)
                tensors += [p, p, counters[device]]
    return tensors


class HostStaging:
    """The host buffers of a run's background saves, and the side stream their device-to-host copies go on."""

    def __init__(self):
        self.cache: Dict = {}  # (dtype, shape, on CUDA) -> buffers
        self.stream = None

    def reserve(self, obj: Any) -> int:
        """Allocate buffers for the tensors of ``obj`` (``state_like``) that the pool lacks; returns the bytes."""
        return reserve_host_buffers(obj, self.cache)

    def buffers(self) -> List[torch.Tensor]:
        return [b for buffers in self.cache.values() for b in buffers]

    def copy(self, obj: Any) -> Tuple[Any, Optional[Any]]:
        """``obj`` with its tensors copied into the buffers, and the CUDA event the copies are done at (None when
        ``obj`` holds no CUDA tensor: the copies are done on return). The buffers are overwritten: the previous
        copy must have been written out before."""
        device = next((t.device for t in _tensors(obj) if t.is_cuda), None)
        if device is None:
            return host_copy(obj, self.cache), None
        current = torch.cuda.current_stream(device)
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(current)  # after the queued steps that wrote the tensors
        with torch.cuda.stream(self.stream):
            staged = host_copy(obj, self.cache)
        done = torch.cuda.Event(blocking=True)  # the writer sleeps on it rather than spins
        done.record(self.stream)
        current.wait_event(done)  # later in-place updates (and reuse of freed memory) come after the copies
        return staged, done
