"""One pre-training sample from one image: reading images (a bad one becomes BadImage, skipped and counted by the
datasets), the YFCC zip archives, the seeded random streams and the caption choice, and ``PairMaker``, which turns
an image and its captions into the family's views (decode once, view many: the views' parameters are drawn first,
then the image is decoded, a large JPEG at the DCT scale all their crops allow, and the views rendered from it).

Used by the map-style datasets (datasets.py) and the WebDataset stream (wds_data.py). References: SLIP
``datasets.py`` (github.com/facebookresearch/SLIP) for the YFCC layout; the views themselves are in views.py
(built by augment.build_transforms).
"""
import io
import os
import random
import zipfile
from contextlib import contextmanager
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageFile

import augment
import utils
import views
from augment import Batch

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated image is a bad sample: skipped and counted, never half-read
MAX_BAD_RETRIES = 50  # consecutive bad replacements before a sample gives up (the data is then mostly missing)


def pil_loader(path: str) -> Image.Image:
    with open(path, 'rb') as f:
        return Image.open(f).convert('RGB')



class BadImage(Exception):
    """An image that is missing, truncated or undecodable; the message names the file."""


IMAGE_ERRORS = (OSError, ValueError, KeyError, EOFError, SyntaxError, zipfile.BadZipFile, Image.DecompressionBombError)
_bad_seen = [0]  # per process (each DataLoader worker has its own copy)


def open_image(source: Any, name: str) -> Image.Image:
    """Open a path, file object or a zero-argument callable returning one: the header only (size, format); the
    pixels are decoded by ``decode``, at a reduced scale if the views allow it. Errors become BadImage."""
    try:
        img = Image.open(source() if callable(source) else source)
    except IMAGE_ERRORS as e:
        raise BadImage(f'{name}: {type(e).__name__}: {e}') from e
    img.info['source_name'] = name
    return img


def decode(img: Image.Image, reduce: int = 1) -> Tuple[Image.Image, int]:
    """The RGB pixels of an opened image, and the factor they are reduced by: a JPEG not yet decoded is decoded at
    1/``reduce`` of its size (PIL's draft: libjpeg's DCT scaling; ``reduce`` 1, 2, 4 or 8). Errors become BadImage.
    """
    scale = 1
    try:
        if reduce > 1:
            width = img.width
            drafted = img.draft('RGB', (width // reduce, img.height // reduce))  # None unless a JPEG not yet read
            if drafted is not None:  # (mode, (0, 0, width / scale, height / scale))
                scale = round(width / drafted[1][2])
        img.load()
        return (img if img.mode == 'RGB' else img.convert('RGB')), scale
    except IMAGE_ERRORS as e:
        raise BadImage(f'{img.info.get("source_name", "image")}: {type(e).__name__}: {e}') from e


def load_image(source: Any, name: str) -> Image.Image:
    """Decode a path, file object or a zero-argument callable returning one, to RGB; errors become BadImage."""
    return decode(open_image(source, name))[0]


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


def yfcc_loader(root: str, photo_id: int, load: Callable[[Any, str], Any] = None) -> Image.Image:
    """YFCC image 12345678 is member ``678.jpg`` of ``<root>/images/12/345.zip``; ``load`` (default ``open_image``:
    opened, decoded later by PairMaker) takes (zero-argument callable giving a file object, name)."""
    s = f'{int(photo_id):08d}'
    archive, member = os.path.join(root, 'images', s[:2], s[2:5] + '.zip'), s[5:] + '.jpg'
    return (load or open_image)(lambda: io.BytesIO(_zip_read(archive, member)), f'{archive}:{member}')


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
        # (Batch field, transform) in the order their parameters are drawn
        self.view_transforms = ([('image', self.clip_transform)] if family != 'simclr' else []) + \
            ([('aug1', self.ssl_augment), ('aug2', self.ssl_augment)] if family != 'clip' else [])
        self.staged = all(hasattr(t, 'draw') and hasattr(t, 'render') for _, t in self.view_transforms)
        # Process-local: a DataLoader worker sees set_epoch calls made before it started (or made inside it, as
        # train_data.EpochIndexed does by passing the epoch with each index), not later calls in the main process.
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, *key])

    def make(self, image: Image.Image, captions: Sequence[str], rng: np.random.Generator, n_bad: int) -> Batch:
        """The sample's views of ``image`` (decoded, or opened by ``open_image`` and decoded here: BadImage if it
        cannot be), its caption's tokens and the kept patch tokens, every draw from ``rng``.

        Views with ``draw``/``render`` (views.py: the default) are all drawn first, in the order the transforms
        drew before (CLIP view, then each SimCLR view), so that a JPEG is decoded once at the DCT scale all their
        crops allow; other transforms (--device-augment's CropFlipParams, a caller's own) see the decoded image."""
        caption = pick_caption(captions, rng) if self.family != 'simclr' else ''
        sample = Batch(n_bad=torch.tensor(n_bad, dtype=torch.int64))
        with seeded_rngs(int(rng.integers(2 ** 63))):
            if self.staged:
                params = [t.draw(*image.size) for _, t in self.view_transforms]
            else:
                image = decode(image)[0]
                made = {f: t(image) for f, t in self.view_transforms}
            # the kept tokens are drawn after every draw above, so runs without masking see the same views
            if self.ssl_keep is not None:
                sample.aug1_keep = augment.draw_keep(*self.ssl_keep)
                sample.aug2_keep = augment.draw_keep(*self.ssl_keep)
            if self.clip_keep is not None:
                sample.image_keep = augment.draw_keep(*self.clip_keep)
        if self.staged:
            crops = [c for (_, t), p in zip(self.view_transforms, params) for c in t.crops(p)]
            image, reduced = decode(image, views.draft_scale(crops))
            made = {f: t.render(image, p, reduced) for (f, t), p in zip(self.view_transforms, params)}
        if 'aug1' in made and isinstance(made['aug1'], tuple):  # device_augment: (uint8 view, its parameters) each
            sample.aug_params = torch.stack([made['aug1'][1], made['aug2'][1]])
            made['aug1'], made['aug2'] = made['aug1'][0], made['aug2'][0]
        for f, _ in self.view_transforms:
            setattr(sample, f, made[f])
        if self.family != 'simclr':
            sample.text = self.tokenizer(caption)
        return sample
