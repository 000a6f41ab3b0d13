"""Datasets: pre-training image-text data (SLIP formats, WebDataset, demo) and the downstream evaluation sets.

Pre-training (``get_train_dataset``): ``yfcc15m`` (pickle of (photo_id, title, description); images in zip archives),
``coco`` (captions json), ``cc3m`` / ``cc12m`` (npy of dicts), ``redcaps`` (json list from
redcaps/combine_captions.py), ``wds`` (img2dataset tar shards, read with webdataset) and ``demo`` (coloured shapes
drawn in code). A sample is an ``augment.Batch`` with the family's views (CLIP ``image, text``; SimCLR ``aug1, aug2``;
SLIP all four) and ``n_bad``, the count of bad images skipped to produce it; ``Batch.collate`` is the DataLoader's
collate_fn. Every random choice of sample i in epoch e comes from (seed, e, i), so a resumed run sees
bitwise-identical data. Images are normalised float tensors, or (``args.image_format``, as main.py asks) uint8 views
finished on the device by ``augment.finish_views``; with 'device_augment' the SimCLR colour jitter and blur also run
there.

Downstream datasets are described by ``dataset_catalog.json`` entries ``{"path", "type", "train", "test"}`` with type
``imagefolder``, ``filelist`` (``<split>_images.npy`` / ``<split>_labels.npy``), ``special`` (torchvision's
CIFAR-10/100, STL-10 and MNIST, read from local files only) or ``demo`` (the generated demo set).

The metadata of the five SLIP formats is read (without running code), validated and held as flat arrays by
metadata.py; with ``args.metadata_cache`` it is parsed once per node and memory-mapped by every process.

References: SLIP ``datasets.py`` and the data section of its README (github.com/facebookresearch/SLIP) for the
formats; docs/DATASETS.md here; the views are in augment.py.
"""
import io
import math
import os
import random
import zipfile
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile

import augment
import metadata as metadata_lib
import utils
from augment import IMAGENET_MEAN, IMAGENET_STD, Batch, build_transforms  # noqa: F401 (re-exported)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image is a bad sample: skipped and counted, never half-read
PRETRAIN_DATASETS = ('yfcc15m', 'cc3m', 'cc12m', 'coco', 'redcaps', 'wds', 'demo')
MAX_BAD_RETRIES = 50  # consecutive bad replacements before a sample gives up (the data is then mostly missing)


def pil_loader(path: str) -> Image.Image:
    with open(path, 'rb') as f:
        return Image.open(f).convert('RGB')


# ----------------------------------------------------------------------------------------------------------------
# Downstream datasets (zero-shot and linear probe)
# ----------------------------------------------------------------------------------------------------------------
class DatasetMissing(FileNotFoundError):
    """A downstream dataset whose files are not on disk (reported, and the other datasets still run)."""


class FileListDataset(torch.utils.data.Dataset):
    """Images and labels listed in two .npy arrays (paths, labels)."""

    def __init__(self, images: str, labels: str, transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None):
        for path in (images, labels):
            if not os.path.isfile(path):
                raise DatasetMissing(f'file list {path!r} not found')
        self.images = np.load(images, allow_pickle=False)
        self.labels = np.load(labels, allow_pickle=False)
        if len(self.images) != len(self.labels):
            raise ValueError(f'{images!r} lists {len(self.images)} images but {labels!r} has {len(self.labels)} labels')
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = pil_loader(str(self.images[index]))
        target = self.labels[index].item()
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


CLEVR_COUNTS = ['count_10', 'count_3', 'count_4', 'count_5', 'count_6', 'count_7', 'count_8', 'count_9']
SPECIAL = {'cifar10': 'CIFAR10', 'cifar100': 'CIFAR100', 'stl10': 'STL10', 'mnist': 'MNIST'}


def get_downstream_dataset(catalog: Dict[str, Any], name: str, is_train: bool, transform: Callable):
    """Build a catalog dataset's train or test split from local files.

    Raises:
        KeyError: the name is not in the catalog.
        DatasetMissing: its files are not on disk (nothing is downloaded).
    """
    if name not in catalog:
        raise KeyError(f'dataset {name!r} is not in the catalog (known: {", ".join(catalog)})')
    entry = catalog[name]
    root, kind = entry.get('path', ''), entry.get('type')
    if kind == 'demo':
        size = int(entry.get('size', 1024))  # a catalog may ask for a smaller demo set (tests do)
        return DemoZeroShotDataset('train' if is_train else 'test', transform=transform, size=size)
    if kind == 'imagefolder':
        import torchvision
        folder = os.path.join(root, entry['train'] if is_train else entry['test'])
        if not os.path.isdir(folder):
            raise DatasetMissing(f'{name}: image folder {folder!r} not found (set its path in the catalog)')
        return torchvision.datasets.ImageFolder(folder, transform=transform)
    if kind == 'filelist':
        split = entry['train'] if is_train else entry['test']
        target_transform = None
        if name == 'clevr_counts':
            target_transform = lambda label: CLEVR_COUNTS.index(str(label))  # noqa: E731
        return FileListDataset(os.path.join(root, f'{split}_images.npy'), os.path.join(root, f'{split}_labels.npy'),
                               transform, target_transform)
    if kind == 'special':
        if name not in SPECIAL:
            raise ValueError(f'catalog entry {name!r} has type "special", which only {", ".join(SPECIAL)} can have '
                             f'(torchvision datasets); use type imagefolder or filelist for other data')
        import torchvision
        cls = getattr(torchvision.datasets, SPECIAL[name])
        try:
            if name == 'stl10':
                return cls(root, split='train' if is_train else 'test', transform=transform, download=False)
            return cls(root, train=is_train, transform=transform, download=False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DatasetMissing(f'{name}: no local copy under {root!r} ({e})') from e
    raise ValueError(f'dataset {name!r} has unknown type {kind!r} in the catalog')


# ----------------------------------------------------------------------------------------------------------------
# Image reading: bad images become BadImage (skipped and counted by the datasets)
# ----------------------------------------------------------------------------------------------------------------
class BadImage(Exception):
    """An image that is missing, truncated or undecodable; the message names the file."""


IMAGE_ERRORS = (OSError, ValueError, KeyError, EOFError, SyntaxError, zipfile.BadZipFile, Image.DecompressionBombError)
_bad_seen = [0]  # per process (each DataLoader worker has its own copy)


def load_image(source: Any, name: str) -> Image.Image:
    """Decode a path, file object or a zero-argument callable returning one, to RGB; errors become BadImage."""
    try:
        with Image.open(source() if callable(source) else source) as img:
            return img.convert('RGB')
    except IMAGE_ERRORS as e:
        raise BadImage(f'{name}: {type(e).__name__}: {e}') from e


def warn_bad(message: str) -> None:
    """Log a skipped image: the first ten of a process, then only at powers of two (a broken mount is loud enough)."""
    _bad_seen[0] += 1
    n = _bad_seen[0]
    if n <= 10 or n & (n - 1) == 0:
        utils.logger.warning('skipped bad image #%d of process %d: %s', n, os.getpid(), message)


ZIP_KEEP_OPEN = True  # False reopens the archive for every sample (the original's behaviour; a benchmark baseline)
ZIP_CACHE_SIZE = 64
_zip_caches: Dict[int, Dict[str, zipfile.ZipFile]] = {}  # pid -> archive path -> open ZipFile, oldest first


def _zip_read(archive: str, member: str) -> bytes:
    if not ZIP_KEEP_OPEN:
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    pid = os.getpid()
    if pid not in _zip_caches:
        # A forked worker must not reuse its parent's handles: they share one file offset with the parent.
        _zip_caches.clear()
        _zip_caches[pid] = {}
    cache = _zip_caches[pid]
    zf = cache.pop(archive, None) or zipfile.ZipFile(archive)  # reading the central directory once per archive
    cache[archive] = zf  # re-inserted as the most recently used
    if len(cache) > ZIP_CACHE_SIZE:
        cache.pop(next(iter(cache))).close()
    return zf.read(member)


def yfcc_loader(root: str, photo_id: int) -> Image.Image:
    """YFCC image 12345678 is member ``678.jpg`` of ``<root>/images/12/345.zip``."""
    s = f'{int(photo_id):08d}'
    archive, member = os.path.join(root, 'images', s[:2], s[2:5] + '.zip'), s[5:] + '.jpg'
    return load_image(lambda: io.BytesIO(_zip_read(archive, member)), f'{archive}:{member}')


@contextmanager
def seeded_rngs(seed: int):
    """Seed torch's CPU generator and ``random`` (what torchvision's transforms draw from), restoring them after.

    Restoring keeps a ``num_workers=0`` loader from disturbing the training process's own random streams.
    """
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would also reseed every GPU
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)


def pick_caption(captions: Sequence[str], rng: np.random.Generator) -> str:
    """Uniform choice among the captions that are not blank (among all of them if every one is blank)."""
    usable = [c for c in captions if c.strip()] or list(captions)
    return usable[int(rng.integers(len(usable)))] if usable else ''


class PairMaker:
    """Turns one decoded image and its caption into the family's views, from one seed (decode once, view many)."""

    def __init__(self, family: str, transforms: Sequence[Callable], tokenizer: Optional[Callable], seed: int,
                 ssl_keep: Optional[Tuple[int, int]] = None, clip_keep: Optional[Tuple[int, int]] = None):
        """``ssl_keep`` / ``clip_keep``: (patches of the view, patches kept) to mask the SimCLR / CLIP views."""
        if family not in ('clip', 'simclr', 'slip'):
            raise ValueError(f'unknown model family {family!r}; expected clip, simclr or slip')
        if family != 'simclr' and tokenizer is None:
            raise ValueError(f'a {family} dataset needs a tokenizer')
        self.family, self.tokenizer, self.seed = family, tokenizer, int(seed) % 2 ** 64
        self.clip_transform, self.ssl_augment = transforms[0], transforms[1]
        self.ssl_keep = ssl_keep if family != 'clip' else None
        self.clip_keep = clip_keep if family != 'simclr' else None
        # Process-local: a DataLoader worker sees set_epoch calls made before it started (or made inside it, as
        # main.py's EpochIndexed does by passing the epoch with each index), not later calls in the main process.
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *key])

    def make(self, image: Image.Image, captions: Sequence[str], rng: np.random.Generator, n_bad: int) -> Batch:
        caption = pick_caption(captions, rng) if self.family != 'simclr' else ''
        sample = Batch(n_bad=torch.tensor(n_bad, dtype=torch.int64))
        with seeded_rngs(int(rng.integers(2 ** 63))):
            if self.family != 'simclr':
                sample.image, sample.text = self.clip_transform(image), self.tokenizer(caption)
            if self.family != 'clip':
                a1, a2 = self.ssl_augment(image), self.ssl_augment(image)
                if isinstance(a1, tuple):  # device_augment: (uint8 view, colour/blur parameters) each
                    sample.aug1, sample.aug2, sample.aug_params = a1[0], a2[0], torch.stack([a1[1], a2[1]])
                else:
                    sample.aug1, sample.aug2 = a1, a2
            # the kept tokens are drawn after every draw above, so runs without masking see the same views
            if self.ssl_keep is not None:
                sample.aug1_keep = augment.draw_keep(*self.ssl_keep)
                sample.aug2_keep = augment.draw_keep(*self.ssl_keep)
            if self.clip_keep is not None:
                sample.image_keep = augment.draw_keep(*self.clip_keep)
        return sample


# ----------------------------------------------------------------------------------------------------------------
# Pre-training metadata (SLIP_REFERENCE §3.1, §10): parsed, validated and held flat by metadata.py
# ----------------------------------------------------------------------------------------------------------------
parse_metadata = metadata_lib.parse_metadata  # (dataset, path) -> Python records, validated; errors name the file


# ----------------------------------------------------------------------------------------------------------------
# Map-style pre-training dataset (metadata formats and demo)
# ----------------------------------------------------------------------------------------------------------------
class ImageCaptionDataset(torch.utils.data.Dataset):
    """Image-caption pairs read through ``source(index) -> (PIL image, captions)``; bad images are replaced.

    Args:
        source: callable raising BadImage for a bad image; ``len(source)`` samples.
        family: 'clip', 'simclr' or 'slip' (decides the views).
        transforms: (clip_transform, ssl_augment) from build_transforms.
        tokenizer: str -> LongTensor[77] (unused for simclr).
        seed: the run's seed; with the epoch and index it fixes every random choice of a sample.
        masks: PairMaker's ``ssl_keep`` / ``clip_keep`` (token masking of the views).
    """

    def __init__(self, source: Callable, family: str, transforms: Sequence[Callable],
                 tokenizer: Optional[Callable] = None, seed: int = 0, name: str = '', **masks):
        self.source, self.name = source, name
        self.maker = PairMaker(family, transforms, tokenizer, seed, **masks)

    def set_epoch(self, epoch: int) -> None:
        self.maker.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Batch:
        rng = self.maker.rng(index)
        n_bad, i = 0, index
        while True:
            try:
                image, captions = self.source(i)
                break
            except BadImage as e:
                n_bad += 1
                warn_bad(f'{self.name} sample {i}: {e}')
                if n_bad > MAX_BAD_RETRIES:
                    raise RuntimeError(f'{self.name}: {n_bad} bad images in a row while building sample {index}; '
                                       f'is the image root right? last: {e}') from e
                i = int(rng.integers(len(self)))  # the replacement, too, is fixed by (seed, epoch, index)
        return self.maker.make(image, captions, rng, n_bad)


class MetadataSource:
    """The images and captions of one SLIP metadata file (yfcc15m, cc3m, cc12m, coco, redcaps).

    The records are a ``metadata.CompactMetadata`` (flat arrays, no per-record objects); with ``cache`` (a folder,
    main.py ``--metadata-cache``) they are parsed once per node and memory-mapped from there.
    """

    def __init__(self, dataset: str, root: str, metadata: str, cache: Optional[str] = None):
        if dataset not in metadata_lib.FORMATS:
            raise ValueError(f'unknown pre-training dataset {dataset!r}; '
                             f'expected one of {", ".join(PRETRAIN_DATASETS)}')
        self.dataset, self.root = dataset, root
        self.records = metadata_lib.load_metadata(dataset, metadata, cache)

    def __len__(self) -> int:
        return len(self.records)

    def __call__(self, index: int) -> Tuple[Image.Image, Sequence[str]]:
        """(image, candidate captions) of record ``index``; raises BadImage."""
        r, root = self.records[index], self.root
        if self.dataset == 'yfcc15m':
            return yfcc_loader(root, r[0]), (r[1], r[2])
        if self.dataset == 'redcaps':
            path = os.path.join(root, r[0], f'{r[1]}.jpg')
            return load_image(path, path), (r[2],)
        if self.dataset == 'coco':
            path = os.path.join(root, 'train2017', f'{r[0]:012d}.jpg')
        else:  # cc3m / cc12m: a path relative to root
            path = os.path.join(root, r[0])
        return load_image(path, path), r[1]


# ----------------------------------------------------------------------------------------------------------------
# WebDataset shards (img2dataset layout: <key>.jpg|png|webp, <key>.txt, <key>.json)
# ----------------------------------------------------------------------------------------------------------------
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

    ``set_epoch(epoch, start_batch, batch_size)`` has main.py's EpochSampler interface: a run resumed after
    ``start_batch`` batches of the epoch skips, in each worker and without decoding, the samples that worker had
    delivered, and continues bitwise as the uninterrupted run would (the number of workers must then be the same).
    Rank and world size are read at construction (build it after utils.init_distributed_mode).
    """

    RECENT = 16  # recently drawn samples: the replacement pool for a bad image when the buffer is empty

    def __init__(self, urls: str, num_samples: Optional[int], family: str, transforms: Sequence[Callable],
                 tokenizer: Optional[Callable] = None, seed: int = 0, batch_size: int = 1,
                 shuffle_buffer: int = 1000, **masks):
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
                image = load_image(io.BytesIO(data), name)
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


# ----------------------------------------------------------------------------------------------------------------
# Demo data: a coloured shape on a muted background, drawn from its index (nothing downloaded or stored)
# ----------------------------------------------------------------------------------------------------------------
DEMO_COLORS = ['red', 'green', 'blue', 'yellow', 'purple', 'orange', 'white', 'black']
DEMO_SHAPES = ['circle', 'square', 'triangle', 'cross']
DEMO_CLASSNAMES = [f'{c} {s}' for c in DEMO_COLORS for s in DEMO_SHAPES]
DEMO_TEMPLATES = ['a photo of a {}.', 'a drawing of a {}.', 'a {}.']
DEMO_RGB = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 215, 40), (140, 50, 180), (245, 140, 30),
            (250, 250, 250), (15, 15, 15)]
DEMO_BACKGROUNDS = {'grey': (128, 128, 128), 'light grey': (185, 185, 185), 'dark grey': (70, 70, 70),
                    'beige': (196, 186, 160), 'slate': (96, 106, 122), 'olive': (118, 116, 84),
                    'dusty pink': (176, 140, 140), 'sage': (140, 160, 140)}
DEMO_PLACES = ['in the top left', 'at the top', 'in the top right', 'on the left', 'in the centre', 'on the right',
               'in the bottom left', 'at the bottom', 'in the bottom right']
DEMO_SPLITS = {'pretrain': 0, 'test': 1, 'train': 2}  # seed streams: the zero-shot sets never share an image seed
DEMO_SIZE = 64


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    if shape == 'square':
        local = [(math.cos(a), math.sin(a)) for a in (0.25 * math.pi, 0.75 * math.pi, 1.25 * math.pi, 1.75 * math.pi)]
    elif shape == 'triangle':
        angles = [-0.5 * math.pi + k * 2 * math.pi / 3 for k in range(3)]
        local = [(1.15 * math.cos(a), 1.15 * math.sin(a)) for a in angles]
    else:  # cross: two bars of half-width w
        w = 0.35
        local = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w),
                 (-w, 1)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in local]


def demo_sample(index: int, split: str = 'pretrain') -> Tuple[Image.Image, int, List[str]]:
    """Draw demo image ``index`` of ``split``: (64x64 RGB image, class index, captions that name colour and shape)."""
    rng = np.random.default_rng([DEMO_SPLITS[split], index])
    label = index % len(DEMO_CLASSNAMES)  # balanced classes
    color, shape = DEMO_COLORS[label // len(DEMO_SHAPES)], DEMO_SHAPES[label % len(DEMO_SHAPES)]
    rgb = DEMO_RGB[DEMO_COLORS.index(color)]
    # a background clearly unlike the shape's colour, so the colour is always visible
    bgs = [b for b, v in DEMO_BACKGROUNDS.items() if math.dist(v, rgb) > 100]
    bg = bgs[int(rng.integers(len(bgs)))]
    r = float(rng.uniform(9, 20))
    cx, cy = rng.uniform(r + 2, DEMO_SIZE - r - 2, size=2)
    shade = tuple(int(np.clip(v + d, 0, 255)) for v, d in zip(rgb, rng.integers(-15, 16, size=3)))
    img = Image.new('RGB', (DEMO_SIZE, DEMO_SIZE), DEMO_BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    if shape == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=shade)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, float(rng.uniform(0, 2 * math.pi))), fill=shade)
    size = 'small ' if r < 13 else 'large ' if r > 16 else ''
    place = DEMO_PLACES[3 * min(int(cy * 3 / DEMO_SIZE), 2) + min(int(cx * 3 / DEMO_SIZE), 2)]
    captions = [f'a {color} {shape}', f'a {size}{color} {shape} on a {bg} background', f'{color} {shape} {place}',
                f'a photo of a {size}{color} {shape}.', f'a drawing of a {color} {shape} {place}.']
    return img, label, captions


class DemoSource:
    """``n`` demo pre-training pairs (source for ImageCaptionDataset)."""

    def __init__(self, n: int):
        if int(n) <= 0:
            raise ValueError(f'--demo-samples must be positive, got {n}')
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __call__(self, index: int) -> Tuple[Image.Image, List[str]]:
        img, _, captions = demo_sample(index, 'pretrain')
        return img, captions


class DemoZeroShotDataset(torch.utils.data.Dataset):
    """Held-out demo images with their class index (DEMO_CLASSNAMES order), every class equally often."""

    def __init__(self, split: str = 'test', transform: Optional[Callable] = None, size: int = 1024):
        if split not in ('test', 'train'):
            raise ValueError(f"demo zero-shot split must be 'test' or 'train', got {split!r}")
        self.split, self.transform, self.size = split, transform, int(size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img, label, _ = demo_sample(index, self.split)
        return (self.transform(img) if self.transform is not None else img), label


def _keep_spec(spec: Any, size: int, ratio: float) -> Optional[Tuple[int, int]]:
    """(patches of a ``size``-px view, patches kept at mask ``ratio``), or None without masking."""
    if not ratio:
        return None
    num_patches = (size // spec.patch_size) ** 2
    return num_patches, augment.keep_count(num_patches, ratio)


def get_train_dataset(args: Any, tokenizer: Optional[Callable]) -> torch.utils.data.Dataset:
    """The pre-training dataset named by ``args.dataset`` with the views of ``args.model``'s family.

    Reads args.dataset, root, metadata, metadata_cache (a folder; default none: held in memory), model, seed,
    image_format (default 'float'; see build_transforms), ssl_view_size, ssl_mask_ratio and clip_mask_ratio
    (default: the model's size, no masking), demo_samples (demo) and train_num_samples (wds).
    Map-style datasets and the wds IterableDataset both have ``set_epoch``; the wds one has ``num_samples``.
    """
    import models

    spec = models.get_spec(args.model)
    ssl_size = getattr(args, 'ssl_view_size', None) or spec.image_size
    clip_t, ssl_t, _ = build_transforms(spec.image_size, getattr(args, 'image_format', 'float'), ssl_size)
    common = dict(family=spec.family, transforms=(clip_t, ssl_t), tokenizer=tokenizer, seed=getattr(args, 'seed', 0),
                  ssl_keep=_keep_spec(spec, ssl_size, getattr(args, 'ssl_mask_ratio', 0.0)),
                  clip_keep=_keep_spec(spec, spec.image_size, getattr(args, 'clip_mask_ratio', 0.0)))
    if args.dataset == 'wds':
        return WebDatasetPairs(args.root, getattr(args, 'train_num_samples', None), batch_size=getattr(
            args, 'batch_size', 1), shuffle_buffer=getattr(args, 'wds_shuffle_buffer', 1000), **common)
    if args.dataset == 'demo':
        return ImageCaptionDataset(DemoSource(getattr(args, 'demo_samples', 20000)), name='demo', **common)
    source = MetadataSource(args.dataset, args.root, args.metadata, getattr(args, 'metadata_cache', None))
    return ImageCaptionDataset(source, name=args.dataset, **common)
