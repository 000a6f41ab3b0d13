"""One pre-training sample from one image: reading images (a bad one becomes BadImage, skipped and counted by the
datasets), the YFCC zip archives, the seeded random streams and the caption choice, and ``PairMaker``, which turns
a decoded image and its captions into the family's views (decode once, view many).

Used by the map-style datasets (datasets.py) and the WebDataset stream (wds_data.py). References: SLIP
``datasets.py`` (github.com/facebookresearch/SLIP) for the YFCC layout; the views themselves are in augment.py.
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


def yfcc_loader(root: str, photo_id: int, load: Callable[[Any, str], Any] = load_image) -> Image.Image:
    """YFCC image 12345678 is member ``678.jpg`` of ``<root>/images/12/345.zip``; ``load`` as load_image."""
    s = f'{int(photo_id):08d}'
    archive, member = os.path.join(root, 'images', s[:2], s[2:5] + '.zip'), s[5:] + '.jpg'
    return load(lambda: io.BytesIO(_zip_read(archive, member)), f'{archive}:{member}')


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
