"""WebDataset pre-training shards (img2dataset layout: <key>.jpg|png|webp, <key>.txt, <key>.json) read as an exactly
resumable, shuffled stream with the same number of batches on every rank (``--dataset wds``).

References: the webdataset package (its tar reader and brace expansion) and img2dataset's output layout; the
samples' views come from samples.PairMaker.
"""
import io
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

import utils
from samples import MAX_BAD_RETRIES, BadImage, PairMaker, load_image, warn_bad

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp')


class WebDatasetPairs(torch.utils.data.IterableDataset):
    """Tar shards read as an exactly resumable, sample-shuffled stream with the same number of batches on every rank.

    Per epoch, the shard order is shuffled from (seed, epoch) and global worker g of G = ranks x DataLoader workers
    reads shards g, g + G, ... Each worker yields exactly its quota: rank batches ``num_samples // world_size //
    batch_size``, split over the workers in the DataLoader's round-robin order (worker w delivers batches w, w + W,
    ...), reading its shards again when they run short. Samples pass through a shuffle buffer of ``shuffle_buffer``
    raw (undecoded) samples drawn from a generator fixed by (seed, epoch, rank, worker), drained at the end of each
    pass over the worker's shards so that every sample is drawn once per pass. Only a drawn sample is decoded; its
    views and caption come from (seed, epoch, shard, position). A bad image is replaced by a sample drawn from the
    buffer (counted in ``n_bad``), so positions never depend on decoding.

    ``set_epoch(epoch, start_batch, batch_size)`` has train_data.EpochSampler's interface: a run resumed after
    ``start_batch`` batches of the epoch skips, in each worker and without decoding, the samples that worker had
    delivered, and continues bitwise as the uninterrupted run would (the number of workers must then be the same).
    Rank and world size are read at construction (build it after utils.init_distributed_mode).
    """

    RECENT = 16  # recently drawn samples: the replacement pool for a bad image when the buffer is empty

    def __init__(self, urls: str, num_samples: Optional[int], family: str, transforms: Sequence[Callable],
                 tokenizer: Optional[Callable] = None, seed: int = 0, batch_size: int = 1,
                 shuffle_buffer: int = 1000, load: Optional[Callable] = None,
                 encode: Optional[Callable[[PairMaker], PairMaker]] = None, **masks):
        from webdataset.shardlists import expand_urls

        if not num_samples or int(num_samples) <= 0:
            raise ValueError('--dataset wds needs --train-num-samples (the number of samples in the shards) '
                             f'to size the schedule; got {num_samples!r}')
        self.shards = expand_urls(urls) if urls else []
        if not self.shards:
            raise ValueError(f'--root {urls!r}: expected tar shards as a brace pattern, e.g. s/{{00000..00331}}.tar')
        missing = [s for s in self.shards if ':' not in s and not os.path.isfile(s)]
        if missing:
            raise FileNotFoundError(f'{len(missing)} of {len(self.shards)} shards of {urls!r} not found: {missing[:3]}')
        self.num_samples = int(num_samples)
        self.rank, self.world_size = utils.get_rank(), utils.get_world_size()
        self.maker = PairMaker(family, transforms, tokenizer, seed, **masks)
        if encode is not None:  # --decode-device: device_decode.EncodedPairMaker
            self.maker = encode(self.maker)
        self.load = load or load_image  # (file object, name) -> image; --decode-device: device_decode.EncodedLoader
        self.shuffle_buffer = int(shuffle_buffer)
        self.batch_size, self.start_batch = int(batch_size), 0

    @property
    def per_rank_batches(self) -> int:
        """Batches every rank yields per epoch (the same on all ranks)."""
        return self.num_samples // self.world_size // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0, batch_size: Optional[int] = None) -> None:
        self.maker.set_epoch(epoch)
        self.start_batch = int(start_batch)
        if batch_size is not None:
            self.batch_size = int(batch_size)

    @staticmethod
    def worker_batches(batches: int, worker: int, workers: int) -> int:
        """How many of a rank's first ``batches`` batches worker ``worker`` of ``workers`` delivers (round-robin)."""
        return batches // workers + (worker < batches % workers)

    def _worker(self) -> Tuple[int, int]:
        """(logical worker, workers). The loader's round-robin starts at its worker 0, so after a resume at batch b
        its worker 0 plays the worker that delivers batch b: (id + b) mod W."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return (worker + self.start_batch) % workers, workers

    def shards_for_worker(self, worker: Optional[int] = None, workers: Optional[int] = None) -> List[int]:
        """Indices (into ``self.shards``) a rank's (logical) worker reads in the current epoch."""
        if worker is None:
            worker, workers = self._worker()
        order = np.random.default_rng([self.maker.seed, self.maker.epoch]).permutation(len(self.shards))
        g, total = self.rank * workers + worker, self.world_size * workers
        mine = order[g::total]
        # more workers than shards: a worker without a shard of its own reads one shared with another worker
        return [int(s) for s in mine] if len(mine) else [int(order[g % len(order)])]

    def _raw_samples(self, shards: List[int], errors: List[int]):
        """(shard, position, pass, raw sample) over the shards, pass after pass; None marks the end of a pass."""
        from webdataset import tarfile_samples

        def on_error(exn: Exception) -> bool:  # a broken tar member or shard: count it and read on
            errors[0] += 1
            warn_bad(f'webdataset: {type(exn).__name__}: {exn}')
            return True

        for rep in range(2 ** 31):
            got = 0
            for s in shards:
                for pos, sample in enumerate(tarfile_samples([{'url': self.shards[s]}], handler=on_error)):
                    got += 1
                    yield s, pos, rep, sample
            if not got:
                raise RuntimeError(f'no readable sample in shards {[self.shards[s] for s in shards][:3]}')
            yield None

    @staticmethod
    def _shuffled(raw, size: int, rng: np.random.Generator):
        """Draw from a buffer of ``size`` raw samples, drained at each pass end; yields (sample, buffer)."""
        buf: list = []

        def draw():
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            return buf.pop()

        for item in raw:
            if item is None:
                while buf:
                    yield draw(), buf
                continue
            buf.append(item)
            if len(buf) >= size:
                yield draw(), buf

    def _decode(self, item, pool: Sequence, errors: List[int]) -> tuple:
        """The views of a drawn sample; a bad image is replaced by a sample drawn from ``pool``."""
        s, pos, rep, sample = item
        rng = self.maker.rng(s, pos) if rep == 0 else self.maker.rng(s, pos, rep)
        n_bad, errors[0] = errors[0], 0  # tar errors since the last sample are reported with this one
        for _ in range(MAX_BAD_RETRIES + 1):
            name = f'{self.shards[item[0]]}:{item[3].get("__key__")}'
            data = next((item[3][e] for e in IMAGE_EXTS if e in item[3]), None)
            try:
                if data is None:
                    raise BadImage(f'{name}: no image member ({"/".join(IMAGE_EXTS)})')
                image = self.load(io.BytesIO(data), name)
                break
            except BadImage as e:
                n_bad += 1
                warn_bad(str(e))
                others = [x for x in pool if x is not item] or list(pool)
                item = others[int(rng.integers(len(others)))]  # the replacement, too, is fixed by the sample's seed
        else:
            raise RuntimeError(f'webdataset: {n_bad} bad images in a row around {name}; are the shards readable?')
        caption = item[3].get('txt', b'').decode('utf-8', errors='replace')
        return self.maker.make(image, [caption], rng, n_bad)

    def __iter__(self):
        from collections import deque

        worker, workers = self._worker()
        quota = self.worker_batches(self.per_rank_batches, worker, workers) * self.batch_size
        done = self.worker_batches(min(self.start_batch, self.per_rank_batches), worker, workers) * self.batch_size
        if quota <= done:
            return
        errors = [0]
        rng = np.random.default_rng([self.maker.seed, self.maker.epoch, self.rank, worker])
        stream = self._shuffled(self._raw_samples(self.shards_for_worker(worker, workers), errors),
                                max(1, min(self.shuffle_buffer, quota)), rng)
        recent: deque = deque(maxlen=self.RECENT)
        for k, (item, buf) in enumerate(stream):
            recent.append(item)
            if k < done:  # delivered before the resume: skipped undecoded
                if k + 1 == done:
                    errors[0] = 0
                continue
            yield self._decode(item, buf or recent, errors)
            if k + 1 == quota:
                return
