"""Datasets: the entry points for pre-training data (SLIP formats, WebDataset, demo) and the downstream sets.

Pre-training (``get_train_dataset``): ``yfcc15m`` (pickle of (photo_id, title, description); images in zip archives),
``coco`` (captions json), ``cc3m`` / ``cc12m`` (npy of dicts), ``redcaps`` (json list from
redcaps/combine_captions.py), ``wds`` (img2dataset tar shards, read with webdataset) and ``demo`` (coloured shapes
drawn in code). A sample is an ``augment.Batch`` with the family's views (CLIP ``image, text``; SimCLR ``aug1, aug2``;
SLIP all four) and ``n_bad``, the count of bad images skipped to produce it; ``Batch.collate`` is the DataLoader's
collate_fn. Every random choice of sample i in epoch e comes from (seed, e, i), so a resumed run sees
bitwise-identical data. Images are normalised float tensors, or (``args.image_format``, as main.py asks) uint8 views
finished on the device by ``augment.finish_views``; with 'device_augment' the SimCLR colour jitter and blur also run
there; with 'jpeg' (--decode-device; train_data.py) the compressed bytes and the drawn crops travel (device_decode.py).
``get_dataset(train_transform, tokenizer, args)`` is the original's call, with its tuple samples.

Where the rest lives: samples.py (reading images, bad images, the YFCC zips, ``PairMaker``), wds_data.py (the
WebDataset stream), demo_data.py (the demo images), downstream.py (``get_downstream_dataset``: the evaluation sets
of ``dataset_catalog.json``). Their public names are re-exported here, so ``datasets.X`` keeps working.

The metadata of the five SLIP formats is read (without running code), validated and held as flat arrays by
metadata.py; with ``args.metadata_cache`` it is parsed once per node and memory-mapped by every process.

References: SLIP ``datasets.py`` and the data section of its README (github.com/facebookresearch/SLIP) for the
formats; docs/DATASETS.md here; the views are in augment.py.
"""
import os
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from PIL import Image

import augment
import device_decode
import metadata as metadata_lib
import models
import options
from augment import IMAGENET_MEAN, IMAGENET_STD, Batch, build_transforms  # noqa: F401 (re-exported)
from demo_data import (DEMO_CLASSNAMES, DEMO_COLORS, DEMO_RGB, DEMO_SHAPES, DEMO_TEMPLATES,  # noqa: F401
                       DemoSource, DemoZeroShotDataset, demo_sample)
from downstream import (CLEVR_COUNTS, SPECIAL, DatasetMissing, FileListDataset,  # noqa: F401 (re-exported)
                        get_downstream_dataset)
from samples import (IMAGE_ERRORS, MAX_BAD_RETRIES, BadImage, PairMaker, decode, load_image, open_image,  # noqa: F401
                     pick_caption, pil_loader, seeded_rngs, warn_bad, yfcc_loader)
from wds_data import IMAGE_EXTS, WebDatasetPairs  # noqa: F401 (re-exported)

PRETRAIN_DATASETS = ('yfcc15m', 'cc3m', 'cc12m', 'coco', 'redcaps', 'wds', 'demo')
parse_metadata = metadata_lib.parse_metadata  # (dataset, path) -> Python records, validated; errors name the file


# ----------------------------------------------------------------------------------------------------------------
# Map-style pre-training dataset (metadata formats and demo)
# ----------------------------------------------------------------------------------------------------------------
class ImageCaptionDataset(torch.utils.data.Dataset):
    """Image-caption pairs read through ``source(index) -> (PIL image, captions)``; bad images are replaced.

    Args:
        source: callable ``index -> (PIL image, opened or decoded; captions)`` raising BadImage for a bad image;
            ``len(source)`` samples.
        family: 'clip', 'simclr' or 'slip' (decides the views).
        transforms: (clip_transform, ssl_augment) from build_transforms.
        tokenizer: str -> LongTensor[77] (unused for simclr).
        seed: the run's seed; with the epoch and index it fixes every random choice of a sample.
        masks: PairMaker's ``ssl_keep`` / ``clip_keep`` (token masking of the views).
        encode: PairMaker -> the PairMaker used (device_decode's EncodedPairMaker for --decode-device).
    """

    def __init__(self, source: Callable, family: str, transforms: Sequence[Callable],
                 tokenizer: Optional[Callable] = None, seed: int = 0, name: str = '',
                 encode: Optional[Callable[[PairMaker], PairMaker]] = None, **masks):
        self.source, self.name = source, name
        self.maker = PairMaker(family, transforms, tokenizer, seed, **masks)
        if encode is not None:
            self.maker = encode(self.maker)

    def set_epoch(self, epoch: int) -> None:
        self.maker.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Batch:
        rng = self.maker.rng(index)
        n_bad, i = 0, index
        while True:
            try:  # the pixels are decoded in make (at the scale the views allow): a bad image can fail in either
                image, captions = self.source(i)
                return self.maker.make(image, captions, rng, n_bad)
            except BadImage as e:
                n_bad += 1
                warn_bad(f'{self.name} sample {i}: {e}')
                if n_bad > MAX_BAD_RETRIES:
                    raise RuntimeError(f'{self.name}: {n_bad} bad images in a row while building sample {index}; '
                                       f'is the image root right? last: {e}') from e
                i = int(rng.integers(len(self)))  # the replacement, too, is fixed by (seed, epoch, index)


class MetadataSource:
    """The images and captions of one SLIP metadata file (yfcc15m, cc3m, cc12m, coco, redcaps).

    The records are a ``metadata.CompactMetadata`` (flat arrays, no per-record objects); with ``cache`` (a folder,
    main.py ``--metadata-cache``) they are parsed once per node and memory-mapped from there.
    """

    def __init__(self, dataset: str, root: str, metadata: str, cache: Optional[str] = None,
                 load: Optional[Callable] = None):
        if dataset not in metadata_lib.FORMATS:
            raise ValueError(f'unknown pre-training dataset {dataset!r}; '
                             f'expected one of {", ".join(PRETRAIN_DATASETS)}')
        self.dataset, self.root = dataset, root
        self.records = metadata_lib.load_metadata(dataset, metadata, cache)
        self.load = load or open_image  # (path or opener, name) -> image; --decode-device: EncodedLoader

    def __len__(self) -> int:
        return len(self.records)

    def __call__(self, index: int) -> Tuple[Image.Image, Sequence[str]]:
        """(image opened, not yet decoded (samples.open_image), candidate captions) of record ``index``; raises
        BadImage."""
        r, root = self.records[index], self.root
        if self.dataset == 'yfcc15m':
            return yfcc_loader(root, r[0], self.load), (r[1], r[2])
        if self.dataset == 'redcaps':
            path = os.path.join(root, r[0], f'{r[1]}.jpg')
            return self.load(path, path), (r[2],)
        if self.dataset == 'coco':
            path = os.path.join(root, 'train2017', f'{r[0]:012d}.jpg')
        else:  # cc3m / cc12m: a path relative to root
            path = os.path.join(root, r[0])
        return self.load(path, path), r[1]


def _keep_spec(spec: Any, size: int, ratio: float) -> Optional[Tuple[int, int]]:
    """(patches of a ``size``-px view, patches kept at mask ``ratio``), or None without masking."""
    if not ratio:
        return None
    num_patches = (size // spec.patch_size) ** 2
    return num_patches, augment.keep_count(num_patches, ratio)


def _complete(args: Any) -> Any:
    """``args`` with the options they lack at main.py's defaults (they may come from the original's code, tests or
    benchmarks), but no metadata cache: arguments without the option (the original's) never had one."""
    return options.complete(args, metadata_cache=None)


def get_train_dataset(args: Any, tokenizer: Optional[Callable],
                      image_format: Optional[str] = None) -> torch.utils.data.Dataset:
    """The pre-training dataset named by ``args.dataset`` with the views of ``args.model``'s family.

    ``image_format`` (default ``args.image_format``, else 'float'; see build_transforms) may also be 'jpeg': samples
    carry the compressed bytes and the drawn crops (device_decode.py), made by device_decode's EncodedPairMaker and
    read by its EncodedLoader, built here directly. Reads args.dataset, root, metadata, metadata_cache (a folder;
    when ``args`` lack it: none, the metadata held in memory), model, seed, ssl_view_size, ssl_mask_ratio and
    clip_mask_ratio, demo_samples (demo), train_num_samples, batch_size and wds_shuffle_buffer (wds); the options
    ``args`` lack are main.py's defaults (``_complete``).
    Map-style datasets and the wds IterableDataset both have ``set_epoch``; the wds one has ``num_samples``.
    """
    image_format = image_format or getattr(args, 'image_format', 'float')  # set by bench_data.py and tests
    args = _complete(args)
    spec = models.get_spec(args.model)
    ssl_size = args.ssl_view_size or spec.image_size
    jpeg = image_format == 'jpeg'  # device_augment's draws, made from the image's size alone
    clip_t, ssl_t, _ = build_transforms(spec.image_size, 'device_augment' if jpeg else image_format, ssl_size)
    common = dict(family=spec.family, transforms=(clip_t, ssl_t), tokenizer=tokenizer, seed=args.seed,
                  ssl_keep=_keep_spec(spec, ssl_size, args.ssl_mask_ratio),
                  clip_keep=_keep_spec(spec, spec.image_size, args.clip_mask_ratio))
    load, rerunnable = None, args.dataset != 'wds'  # a map-style dataset's samples can be made again
    if jpeg:  # and it validates its images lazily, where the per-sample path decodes them
        common['encode'] = lambda maker: device_decode.EncodedPairMaker(maker, spec.image_size, ssl_size, rerunnable)
        load = device_decode.EncodedLoader(lazy=rerunnable)
    if args.dataset == 'wds':
        return WebDatasetPairs(args.root, args.train_num_samples, batch_size=args.batch_size,
                               shuffle_buffer=args.wds_shuffle_buffer, load=load, **common)
    if args.dataset == 'demo':
        return ImageCaptionDataset(DemoSource(args.demo_samples), name='demo', **common)
    source = MetadataSource(args.dataset, args.root, args.metadata, args.metadata_cache, load)
    return ImageCaptionDataset(source, name=args.dataset, **common)


# The original's samples, by family: the tuple its training loop unpacks.
ORIGINAL_FIELDS = {'clip': ('image', 'text'), 'simclr': ('aug1', 'aug2'), 'slip': ('image', 'text', 'aug1', 'aug2')}


class OriginalSamples(torch.utils.data.Dataset):
    """A pre-training dataset whose samples are the original's tuples (CLIP ``(image, text)``, SimCLR
    ``(aug1, aug2)``, SLIP ``(image, text, aug1, aug2)``), for the default collate_fn and code written against it."""

    def __init__(self, dataset: torch.utils.data.Dataset, family: str):
        self.dataset, self.fields = dataset, ORIGINAL_FIELDS[family]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, ...]:
        sample = self.dataset[index]
        return tuple(getattr(sample, f) for f in self.fields)


def get_dataset(train_transform: Callable, tokenizer: Optional[Callable], args: Any) -> torch.utils.data.Dataset:
    """The original SLIP's ``datasets.get_dataset``: ``train_transform`` makes the CLIP view (the SimCLR views are
    SLIP's augmentation at the model's size, as there) and samples are the original's tuples. Reads what
    ``get_train_dataset`` reads; map-style formats only (yfcc15m, cc3m, cc12m, coco, redcaps, demo)."""
    if args.dataset == 'wds':
        raise ValueError('datasets.get_dataset (the original\'s call) reads the SLIP metadata formats and demo; '
                         'for --dataset wds use datasets.get_train_dataset')
    args = _complete(args)
    spec = models.get_spec(args.model)
    _, ssl_t, _ = build_transforms(spec.image_size, 'float', args.ssl_view_size or spec.image_size)
    if args.dataset == 'demo':
        source = DemoSource(args.demo_samples)
    else:
        source = MetadataSource(args.dataset, args.root, args.metadata, args.metadata_cache)
    dataset = ImageCaptionDataset(source, spec.family, (train_transform, ssl_t), tokenizer, seed=args.seed,
                                  name=args.dataset)
    return OriginalSamples(dataset, spec.family)
