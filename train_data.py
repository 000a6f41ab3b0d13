"""The pre-training input: the dataset, the epoch sampler and the loader, and the batches finished on the device.

``build_train_loader(args, tokenizer, device)`` is main.py's one call: it reads the input options (--decode-device,
--device-augment, --workers, --batch-size), builds the dataset in the format they ask for (datasets.py), the
sampler (``EpochSampler``, or the WebDataset stream's own ``set_epoch``) and a DataLoader, and returns
``DeviceBatches`` over it: an iterator of batches ready for the model on the device.

``DeviceBatches`` finishes each batch with device_decode.finish_batch (with --decode-device: decode the JPEGs, make
the views; always: the colour ops and normalisation of augment.finish_views) one batch ahead of the consumer. On
CUDA it does so on its own stream, so that batch N + 1 is decoded and its views made while the step of batch N
runs on the training stream:
  * the training stream waits for an event recorded after the batch's last kernel before it is handed over, and
    every tensor of the handed batch is marked ``record_stream`` for the training stream, so the caching allocator
    does not give its memory out again before the step has read it;
  * the decode starts with a synchronisation of the side stream (jpeg_decoders.py): nvJPEG's hardware engine does
    not wait for work queued before it, so nothing queued there may still read memory it could be handed.
On the CPU the same code runs without streams, one batch ahead all the same. The batches are the same, bitwise,
with or without prefetching: finishing a batch draws nothing from the random streams (a sample made again after a
bad image is drawn under samples.seeded_rngs, which restores them).

References: NVIDIA Apex's data_prefetcher (the side-stream prefetch with record_stream); torchcodec pull request 1634
and pytorch/vision pull request 9606 (the decoder's race).
"""
import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional, Tuple

import torch

import datasets
import device_decode
from augment import Batch


class EpochSampler(torch.utils.data.Sampler):
    """Deterministic per-epoch shuffle, split over ranks, yielding (epoch, index) pairs from a given offset.

    The order depends only on (seed, epoch), so a resumed run skips exactly the batches it already trained on.
    Passing the epoch with each index lets persistent workers apply the right augmentations.
    """

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.per_rank = size // world_size // batch_size * batch_size  # whole batches only (drop_last)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0, batch_size: int = 1) -> None:
        self.epoch, self.start = epoch, start_batch * batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.size, generator=g)[self.rank::self.world_size][:self.per_rank]
        return iter([(self.epoch, i) for i in order[self.start:].tolist()])

    def __len__(self) -> int:
        return self.per_rank - self.start


class EpochIndexed(torch.utils.data.Dataset):
    """A map-style dataset indexed by EpochSampler's (epoch, index) pairs: the epoch is set in the worker first."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


def image_format(args: Any) -> str:
    """What the workers send, from --decode-device and --device-augment (read here only): 'jpeg' (the bytes and the
    drawn crops), 'device_augment' (uint8 views, colour ops left to the device) or 'uint8' (finished views)."""
    if args.decode_device not in (None, 'worker'):
        return 'jpeg'
    return 'device_augment' if args.device_augment else 'uint8'


def build_train_loader(args: Any, tokenizer: Optional[Callable], device: torch.device
                       ) -> Tuple['DeviceBatches', Any, int]:
    """(batches finished on ``device``, the sampler to ``set_epoch``, batches per epoch and rank)."""
    dataset = datasets.get_train_dataset(args, tokenizer, image_format(args))
    common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=device.type == 'cuda',
                  drop_last=True, persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None)
    decode = args.decode_device
    # captions cut to the batch's longest, rounded up (--text-pad-multiple; 0: all 77 tokens kept)
    collate = functools.partial(Batch.collate, text_pad_multiple=getattr(args, 'text_pad_multiple', 0))
    if isinstance(dataset, torch.utils.data.IterableDataset):  # WebDataset: it has EpochSampler's set_epoch
        common['persistent_workers'] = False  # the epoch and resume position reach the workers when they start
        loader = torch.utils.data.DataLoader(dataset, collate_fn=collate, **common)
        return DeviceBatches(loader, device, decode), dataset, dataset.per_rank_batches
    sampler = EpochSampler(len(dataset), args.batch_size, args.rank, args.world_size, args.seed)
    loader = torch.utils.data.DataLoader(EpochIndexed(dataset), sampler=sampler, collate_fn=collate, **common)
    return DeviceBatches(loader, device, decode, dataset), sampler, sampler.per_rank // args.batch_size


@dataclasses.dataclass
class _Ready:
    batch: Batch  # finished, on the device
    event: Optional[torch.cuda.Event]  # recorded on the side stream after its last kernel


class DeviceBatches:
    """The loader's batches finished on ``device`` (device_decode.finish_batch), prepared one batch ahead; on CUDA
    on a stream of their own (the module docstring). ``dataset``: the map-style dataset behind the loader (a
    sample whose image fails in the main process is made again from it). ``prefetch=False``: each batch is
    finished when it is asked for (the plain path)."""

    def __init__(self, loader: Any, device: torch.device, decode_device: Optional[str] = 'worker',
                 dataset: Any = None, prefetch: bool = True):
        self.loader, self.device, self.dataset, self.prefetch = loader, torch.device(device), dataset, prefetch
        self.decode_device = None if decode_device in (None, 'worker') else decode_device
        self.stream = None

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        if self.device.type == 'cuda' and self.prefetch and self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
        batches = iter(self.loader)
        if not self.prefetch:
            for raw in batches:
                yield self._hand_over(self._prepare(raw))
            return
        pending = self._prepare(next(batches, None))
        while pending is not None:
            upcoming = self._prepare(next(batches, None))  # batch N + 1, queued before step N is
            yield self._hand_over(pending)
            pending = upcoming

    def _prepare(self, raw: Optional[Batch]) -> Optional[_Ready]:
        if raw is None:
            return None
        if self.stream is None:
            return _Ready(self.finish(raw), None)
        with torch.cuda.stream(self.stream):
            batch = self.finish(raw)
            event = torch.cuda.Event()
            event.record(self.stream)
        return _Ready(batch, event)

    def finish(self, raw: Batch) -> Batch:
        return device_decode.finish_batch(raw, self.device, self.decode_device, self.dataset)

    def _hand_over(self, ready: _Ready) -> Batch:
        if ready.event is None:
            return ready.batch
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_event(ready.event)
        for t in ready.batch.tensors().values():
            if t.device.type == 'cuda':
                t.record_stream(consumer)  # not reused before the consumer's work on it is done
        return ready.batch

