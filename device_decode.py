"""--decode-device: the workers send each image's compressed JPEG bytes and the crops drawn for its views; the main
process decodes the batch (nvImageCodec or nvJPEG with ``cuda``, libjpeg on the CPU with ``cpu``) and crops, resizes and flips the
views on the device, where --device-augment's colour jitter, grayscale and blur follow (augment.finish_views).

Worker side (datasets.get_train_dataset builds a pre-training dataset of datasets.py or wds_data.py with these when
its image format is 'jpeg'):
  * ``EncodedLoader`` stands in for samples.load_image. It reads the file's bytes, opens the header with PIL (size,
    mode) and validates a JPEG with a 1/8-scale DCT-domain decode (PIL's ``draft``): that parses the whole
    entropy-coded stream, so it raises where the full decode raises (truncated or garbage data), for about 60% of a
    full decode's cost (README, Performance). A bad image raises BadImage and the dataset replaces it with its own
    loop, drawing the same replacement and counting the same ``n_bad`` as the per-sample path. Images that are not
    8-bit RGB or grayscale JPEGs (PNG or WebP in shards, CMYK JPEGs, the demo's drawn images) are decoded in the
    worker with PIL, as the per-sample path does, and travel as raw RGB pixels instead of bytes.
  * ``EncodedPairMaker`` makes the sample's draws without its pixels: the caption, the CLIP view's RandomResizedCrop
    and the SimCLR views' crop, flip, colour and blur parameters come from the sample's seeded streams with the calls,
    in the order, of PairMaker.make with build_transforms' 'device_augment' views, from the image's size alone. A
    sample's draws are therefore the same function of (seed, epoch, index) as there: resume stays bitwise.

Main process (``finish_batch``, which train_data.DeviceBatches calls for every batch, one batch ahead of the step):
  * the batch's JPEGs are decoded in one batched call (jpeg_decoders.py: libjpeg on the CPU; nvImageCodec, or
    torchvision's nvJPEG call, on a GPU). A JPEG the decoder rejects is decoded with PIL on the CPU, as the
    per-sample path would have. One that PIL rejects too (it passed the worker's check; not seen in practice) is replaced as that
    path replaces it: for a map-style dataset the main process makes the sample again with full decodes
    (``EncodedLoader.strict``), which draws the same replacement with the same ``n_bad``; a WebDataset stream cannot
    be rewound, so there the next good sample of the batch stands in for it, with ``n_bad`` one higher. The replaced
    rows are rewritten in the loader's batch, so the epoch's bad-image count sees them.
  * every view is cropped from its decoded image, resized with PIL's antialiased bilinear filter and flipped: on a
    GPU all crops of the batch at once (batch_views.py), on the CPU crop by crop with ``F.interpolate`` on the uint8
    pixels (there cheaper): a device_augment-format batch, which augment.finish_views completes. Against the
    per-sample path (PIL crop and resize in the worker) the uint8 views differ by rounding only
    (tests/test_device_decode.py, tests/test_batch_views.py).
"""
import dataclasses
import io
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import augment
import batch_views
import samples
from jpeg_decoders import jpeg_decoder
from augment import Batch
from samples import IMAGE_ERRORS, BadImage, PairMaker

DECODE_DEVICES = ('worker', 'cpu', 'cuda')
INFO_FIELDS = ('nbytes', 'height', 'width', 'pixels', 'epoch', 'index')  # Batch.jpeg_info, per sample
CROP_FIELDS = ('top', 'left', 'height', 'width', 'flip', 'size')  # Batch.crops, per sample and view; size 0: no view
JPEG_MODES = ('RGB', 'L')  # JPEGs decoded as bytes; others (CMYK, 12-bit) are decoded in the worker


def check_args(args, errors: List[str]) -> None:
    """main.py's start-up check of --decode-device: append one message per bad setting to ``errors``."""
    decode = args.decode_device
    if decode == 'cuda' and not torch.cuda.is_available():
        errors.append('--decode-device cuda needs a CUDA GPU (nvJPEG) and none is available; use --decode-device cpu '
                      'or worker')
    elif decode == 'cuda' and args.device is not None and not str(args.device).startswith('cuda'):
        errors.append(f'--decode-device cuda decodes on the training GPU; it cannot train on --device {args.device}')


# ----------------------------------------------------------------------------------------------------------------
# Worker side
# ----------------------------------------------------------------------------------------------------------------
class EncodedImage:
    """An image as a worker sends it: its JPEG bytes, or (``pixels``) its decoded RGB pixels row by row."""

    def __init__(self, data: np.ndarray, height: int, width: int, pixels: bool):
        self.data, self.height, self.width, self.pixels = data, int(height), int(width), bool(pixels)
        self.pending: Optional[str] = None  # the name of an image read but not yet validated (EncodedLoader)

    def validate(self) -> 'EncodedImage':
        """Check an image read by EncodedLoader: a JPEG by a 1/8-scale DCT-domain decode (it parses the whole
        entropy-coded stream, so it raises where the full decode raises, for a fraction of its cost), any other
        image by decoding it to the RGB pixels it then travels as. Raises BadImage naming the file."""
        if self.pending is None:
            return self
        name, self.pending = self.pending, None
        if self.pixels:  # not a JPEG sent as bytes: decoded here, as the per-sample path decodes it
            return EncodedImage.from_pil(samples.load_image(io.BytesIO(self.data.tobytes()), name))
        try:
            with Image.open(io.BytesIO(self.data.tobytes())) as img:
                img.draft(img.mode, (max(1, self.width // 8), max(1, self.height // 8)))  # no full IDCT
                img.load()  # raises on truncated or undecodable data, as the full decode would
        except IMAGE_ERRORS as e:
            raise BadImage(f'{name}: {type(e).__name__}: {e}') from e
        return self

    @classmethod
    def from_pil(cls, img: Image.Image) -> 'EncodedImage':
        rgb = np.array(img.convert('RGB'), dtype=np.uint8)
        return cls(rgb.reshape(-1), rgb.shape[0], rgb.shape[1], pixels=True)

    def shape_like(self) -> torch.Tensor:
        """A [3, H, W] tensor without memory: all that torchvision's RandomResizedCrop.get_params reads."""
        return torch.empty(1, 1, 1, dtype=torch.uint8).expand(3, self.height, self.width)


def _read_bytes(source: Any) -> bytes:
    f = source() if callable(source) else source
    if isinstance(f, (str, os.PathLike)):
        with open(f, 'rb') as fh:
            return fh.read()
    return f.getvalue() if hasattr(f, 'getvalue') else f.read()


class EncodedLoader:
    """samples.load_image's (or, ``lazy``, samples.open_image's) stand-in for --decode-device: (path, file object or
    opener, name) -> EncodedImage. Raises BadImage.

    A JPEG is validated with a 1/8-scale decode and sent as bytes; any other image is decoded with load_image. With
    ``lazy`` (map-style datasets, whose per-sample path opens the header here and decodes in PairMaker.make) only
    the header is read here and ``EncodedImage.validate`` does the rest where the per-sample path decodes, so a bad
    image is found after the same draws and replaced by the same one. With ``strict`` (the main process making a
    sample again) every image is decoded with load_image."""

    def __init__(self, lazy: bool = False):
        self.strict, self.lazy = False, lazy

    def __call__(self, source: Any, name: str) -> EncodedImage:
        try:
            data = _read_bytes(source)
            with Image.open(io.BytesIO(data)) as img:  # reads the header only
                w, h = img.size
                jpeg = img.format == 'JPEG' and img.mode in JPEG_MODES and not self.strict
        except IMAGE_ERRORS as e:
            raise BadImage(f'{name}: {type(e).__name__}: {e}') from e
        enc = EncodedImage(np.frombuffer(data, dtype=np.uint8), h, w, pixels=not jpeg)
        enc.pending = name
        return enc if self.lazy else enc.validate()


def _crop_row(img: EncodedImage, crop, size: int, flip: bool = False) -> torch.Tensor:
    top, left, h, w = crop.get_params(img.shape_like(), crop.scale, crop.ratio)
    return torch.tensor([top, left, h, w, int(flip), size], dtype=torch.int64)


class ClipCrop:
    """The CLIP view's draws (build_transforms: RandomResizedCrop(size, scale=(0.5, 1))): its crop row [6]."""

    def __init__(self, size: int):
        import torchvision.transforms as T
        self.size, self.crop = size, T.RandomResizedCrop(size, scale=(0.5, 1.0))

    def __call__(self, img: EncodedImage) -> torch.Tensor:
        return _crop_row(img, self.crop, self.size)


class SslCropFlip:
    """A SimCLR view's draws, those of augment.CropFlipParams in its order: (crop row [6], colour/blur params [12])."""

    def __init__(self, size: int):
        import torchvision.transforms as T
        self.size, self.crop = size, T.RandomResizedCrop(size, scale=(0.08, 1.0))

    def __call__(self, img: EncodedImage) -> Tuple[torch.Tensor, torch.Tensor]:
        top, left, h, w = self.crop.get_params(img.shape_like(), self.crop.scale, self.crop.ratio)
        u = torch.rand(8)
        jitter = [float(u[1] < 0.8), *(0.6 + 0.8 * u[2:5]).tolist(), float(u[5] * 0.2 - 0.1)]
        order = torch.randperm(4).float().tolist()
        params = torch.tensor(jitter + order + [float(u[6] < 0.2), float(u[7] < 0.5), 0.1 + 1.9 * float(torch.rand(1))])
        return torch.tensor([top, left, h, w, int(u[0] < 0.5), self.size], dtype=torch.int64), params


class EncodedPairMaker(PairMaker):
    """PairMaker whose samples carry the image's bytes and its views' drawn crops instead of the views.

    ``make`` draws what PairMaker.make draws with build_transforms' 'device_augment' views, in its order (the
    caption, the sample's torch seed, the CLIP view, each SimCLR view, the kept tokens); it does not go through
    PairMaker.make, whose decoding is the host path's own business. ``rerunnable``: the dataset is map-style, so the
    main process can make a sample again from (epoch, index), learnt from the dataset's ``rng(index)`` call that
    starts every sample."""

    def __init__(self, maker: PairMaker, image_size: int, ssl_size: int, rerunnable: bool):
        self.__dict__.update(vars(maker))
        self.clip_transform, self.ssl_augment = ClipCrop(image_size), SslCropFlip(ssl_size)
        self.rerunnable, self.key = rerunnable, ()

    def rng(self, *key: int) -> np.random.Generator:
        self.key = key
        return super().rng(*key)

    def make(self, image, captions: Sequence[str], rng: np.random.Generator, n_bad: int) -> Batch:
        enc = image if isinstance(image, EncodedImage) else EncodedImage.from_pil(image)
        caption = samples.pick_caption(captions, rng) if self.family != 'simclr' else ''
        sample = Batch(n_bad=torch.tensor(n_bad, dtype=torch.int64))
        crops = torch.zeros(len(Batch.VIEWS), len(CROP_FIELDS), dtype=torch.int64)
        seed = int(rng.integers(2 ** 63))
        enc = enc.validate()  # a lazily read image fails here, after the draws before PairMaker.make's decode
        with samples.seeded_rngs(seed):
            if self.family != 'simclr':
                crops[0] = self.clip_transform(enc)
            if self.family != 'clip':
                (crops[1], p1), (crops[2], p2) = self.ssl_augment(enc), self.ssl_augment(enc)
                sample.aug_params = torch.stack([p1, p2])
            if self.ssl_keep is not None:  # after every view's draws, as PairMaker.make
                sample.aug1_keep = augment.draw_keep(*self.ssl_keep)
                sample.aug2_keep = augment.draw_keep(*self.ssl_keep)
            if self.clip_keep is not None:
                sample.image_keep = augment.draw_keep(*self.clip_keep)
        if self.family != 'simclr':
            sample.text = self.tokenizer(caption)
        index = self.key[0] if self.rerunnable and len(self.key) == 1 else -1
        sample.jpeg = torch.from_numpy(enc.data if enc.data.flags.writeable else enc.data.copy())
        sample.jpeg_info = torch.tensor([enc.data.size, enc.height, enc.width, int(enc.pixels), self.epoch, index])
        sample.crops = crops
        return sample


# ----------------------------------------------------------------------------------------------------------------
# Main process: decode, replace what cannot be decoded, crop and resize
# ----------------------------------------------------------------------------------------------------------------
def finish_batch(batch: Batch, device, decode_device: Optional[str] = None, dataset: Any = None) -> Batch:
    """The model's inputs on ``device`` from a loader's batch: its views decoded and made here when the workers sent
    bytes (``decode_device``: 'cpu' or 'cuda', default ``device``; ``dataset``, the map-style dataset of bytes, to
    make a sample again), then augment.finish_views. A batch without bytes is moved and finished as before.
    ``n_bad`` stays on the host (rewritten for replaced samples): the epoch's count reads it without waiting."""
    if batch.jpeg is None:
        done = augment.finish_views(batch.to(device, non_blocking=True))
    else:
        done = augment.finish_views(decode_views(batch, device, decode_device, dataset))
    return dataclasses.replace(done, n_bad=batch.n_bad)


def decode_views(batch: Batch, device, decode_device: Optional[str] = None, dataset: Any = None) -> Batch:
    """A batch of bytes and crops -> the device_augment-format batch on ``device``: uint8 views [B, S, S, 3]."""
    device = torch.device(device)
    images = decode_images(batch, _decoder_device(decode_device, device), dataset)
    views = crop_views([img.to(device) for img in images], batch.crops)
    rest = dataclasses.replace(batch, jpeg=None, jpeg_info=None, crops=None).to(device, non_blocking=True)
    return dataclasses.replace(rest, **views)


def _decoder_device(decode_device: Optional[str], device: torch.device) -> torch.device:
    if decode_device in (None, 'worker'):
        return device
    dec = torch.device(decode_device)
    return device if dec.type == device.type and dec.index is None else dec  # 'cuda': this rank's GPU


def _split(batch: Batch) -> List[torch.Tensor]:
    return list(batch.jpeg.split(batch.jpeg_info[:, 0].tolist()))


def _pixels(data: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return data.view(height, width, 3).permute(2, 0, 1)


def decode_images(batch: Batch, device: torch.device, dataset: Any = None) -> List[torch.Tensor]:
    """Each sample's image, uint8 [3, H, W] on ``device`` (pixels sent by a worker stay where they are)."""
    chunks, info = _split(batch), batch.jpeg_info.tolist()
    images: List[Optional[torch.Tensor]] = [None] * len(info)
    jpegs = [i for i, row in enumerate(info) if not row[3]]
    for i, row in enumerate(info):
        if row[3]:
            images[i] = _pixels(chunks[i], row[1], row[2])
    if jpegs:
        for i, img in zip(jpegs, jpeg_decoder(device)([chunks[i] for i in jpegs], device)):
            images[i] = img
    bad = [i for i, img in enumerate(images) if img is None]
    for i in bad:  # rejected by the decoder: PIL on the CPU, as the per-sample path would decode it
        try:
            images[i] = torch.from_numpy(np.array(samples.load_image(io.BytesIO(chunks[i].numpy().tobytes()),
                                                                     _name(batch, i)))).permute(2, 0, 1)
        except BadImage as e:
            samples.warn_bad(f'{e} (passed the worker\'s check; replaced in the main process)')
    for i in [i for i in bad if images[i] is None]:
        images[i] = _replace(batch, i, images, dataset)
    return images


def _name(batch: Batch, i: int) -> str:
    epoch, index = batch.jpeg_info[i, 4:].tolist()
    return f'sample {index} of epoch {epoch}' if index >= 0 else f'row {i} of a batch of epoch {epoch}'


def _map_dataset(dataset: Any) -> Optional[Any]:
    """``dataset`` if it is a map-style dataset of bytes (one whose samples can be made again), else None."""
    maker = getattr(dataset, 'maker', None)
    return dataset if isinstance(maker, EncodedPairMaker) and maker.rerunnable else None


def _replace(batch: Batch, i: int, images: List[Optional[torch.Tensor]], dataset: Any) -> torch.Tensor:
    """Sample ``i`` again (map-style) or the batch's next good sample (WebDataset): its image, with its rows
    rewritten in ``batch`` (text, parameters, masks, crops, n_bad)."""
    ds, (epoch, index) = _map_dataset(dataset), batch.jpeg_info[i, 4:].tolist()
    if ds is not None and index >= 0:
        new = _remake(ds, epoch, index)
        image = _pixels(new.jpeg, *new.jpeg_info[1:3].tolist())
        rows = {k: v for k, v in new.tensors().items() if k not in Batch.FLAT and k != 'jpeg_info'}
    else:
        order = list(range(i + 1, len(images))) + list(range(i))
        j = next((j for j in order if images[j] is not None), None)
        if j is None:
            raise RuntimeError(f'no decodable image in a batch of {len(images)}: are the shards readable?')
        image = images[j]
        rows = {k: v[j].clone() for k, v in batch.tensors().items() if k not in Batch.HOST}
        rows['crops'] = batch.crops[j].clone()
        rows['n_bad'] = batch.n_bad[i] + 1
    if 'text' in rows and rows['text'].shape[0] > batch.text.shape[1]:  # the collate cut the ids (--text-pad-multiple)
        _fit_text(batch, rows['text'])
        rows['text'] = rows['text'][:batch.text.shape[1]]
    for k, v in rows.items():
        getattr(batch, k)[i] = v
    return image


def _fit_text(batch: Batch, text: torch.Tensor) -> None:
    """A remade sample's caption ``text`` [77] longer than the collate's cut of the batch's ids: the batch gets back
    all the context's columns (77 is one of the cut's lengths too; this happens only for a bad image)."""
    if int(text.argmax()) + 1 > batch.text.shape[1]:
        pad = batch.text.new_zeros(len(batch.text), text.shape[0] - batch.text.shape[1])
        batch.text = torch.cat([batch.text, pad], dim=1)


def _remake(ds: Any, epoch: int, index: int) -> Batch:
    """The sample ``index`` of ``epoch`` made again in this process with every image decoded by PIL (the worker's
    1/8-scale check passed an image that does not decode): the per-sample path's replacement, draw for draw."""
    loader = getattr(getattr(ds, 'source', None), 'load', None)
    old_epoch = ds.maker.epoch
    if isinstance(loader, EncodedLoader):
        loader.strict = True
    try:
        ds.set_epoch(epoch)
        return ds[index]
    finally:
        ds.set_epoch(old_epoch)
        if isinstance(loader, EncodedLoader):
            loader.strict = False


def crop_views(images: Sequence[torch.Tensor], crops: torch.Tensor,
               uint8: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """Each view of each image: crop, antialiased bilinear resize, flip -> {view: uint8 [B, S, S, 3]}.

    By default on the CPU (``uint8``) crop by crop with torch's PIL-like fixed-point kernel on the uint8 pixels
    (``crop_views_each``: there several times cheaper than the dense products); elsewhere every crop of the batch at
    once (batch_views.resize_views: a few kernels whatever the batch size). Both stay within the tolerance of
    batch_views' docstring of PIL's resize (tests/test_batch_views.py, tests/test_device_decode.py)."""
    if uint8 is None:
        uint8 = images[0].device.type == 'cpu'
    if uint8:
        return crop_views_each(images, crops, uint8=True)
    return batch_views.resize_views(batch_views.pad_images(images), crops, Batch.VIEWS)


def crop_views_each(images: Sequence[torch.Tensor], crops: torch.Tensor, uint8: bool) -> Dict[str, torch.Tensor]:
    """crop_views one crop at a time: ``F.interpolate(bilinear, antialias=True)`` per crop, on the uint8 pixels
    (``uint8``) or in float32 rounded to uint8 after (the per-crop path bench.py data compares against)."""
    rows = crops.tolist()
    views = {}
    for v, name in enumerate(Batch.VIEWS):
        size = rows[0][v][5]
        if not size:
            continue
        parts = []
        for img, row in zip(images, rows):
            top, left, h, w, flip, _ = row[v]
            x = img[None, :, top:top + h, left:left + w]
            x = x.contiguous(memory_format=torch.channels_last) if uint8 else x.float()
            x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False, antialias=True)
            parts.append(x.flip(-1) if flip else x)
        x = torch.cat(parts)
        views[name] = (x if uint8 else x.round_().clamp_(0, 255).to(torch.uint8)).permute(0, 2, 3, 1)
    return views
