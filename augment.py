"""The image views of pre-training, the batch that carries them, and how it is finished on the device.

``Batch`` is the one container of a sample's or a batch's inputs (views, tokens, --device-augment parameters, the
bad-image count, the kept patch tokens of masked views): workers make it, ``Batch.collate`` stacks it,
``finish_views`` completes it on the device and the models' ``forward`` takes it.

``build_transforms(size, image_format)`` gives the CLIP view, the SimCLR augmentation (views.py: torchvision's
draws and PIL's pixels, bitwise, at less CPU cost) and the evaluation transform:
  * 'float': ImageNet-normalised float tensors made in the worker (the original);
  * 'uint8': the same PIL pipeline handing over uint8 [H, W, 3] tensors; ``finish_views`` then divides by 255 and
    normalises on the device, bitwise what ToTensor + Normalize give in the worker, with a quarter of the bytes
    pinned and copied (main.py's default);
  * 'device_augment': the worker only crops and flips the SimCLR views and draws their colour and blur parameters;
    ``finish_views`` applies SimCLR's colour jitter, grayscale and Gaussian blur batched on the device (the same
    distributions, other numerics: torch instead of PIL; ``main.py --device-augment``).

References: SimCLR (Chen et al., arXiv 2002.05709) and MoCo v3 (arXiv 2104.02057) augmentations; HSV as in PIL.
"""
import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

import views

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class GaussianBlur:
    """PIL Gaussian blur with sigma drawn uniformly from ``sigma`` (SimCLR); draws from Python's ``random``."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


IMAGE_FORMATS = ('float', 'uint8', 'device_augment')


@dataclass
class Batch:
    """The inputs of one pre-training sample (made by a worker) or of a batch of them (``collate``).

    Which fields are set depends on the model family: CLIP ``image, text``; SimCLR ``aug1, aug2``; SLIP all four.
    ``image`` is the CLIP view, ``aug1``/``aug2`` the two SimCLR views: float [3, H, W] (normalised), or uint8
    [H, W, 3] that ``finish_views`` normalises on the device; ``text`` the token ids [77]; ``aug_params``
    --device-augment's colour and blur parameters [2, 12] of (aug1, aug2); ``n_bad`` the number of bad images
    skipped to make this sample (0-dim int64); ``image_keep``/``aug1_keep``/``aug2_keep`` (only with
    --clip-mask-ratio / --ssl-mask-ratio > 0) the indices [n_keep] int64 of the view's patch tokens the model keeps
    (sorted; the class token is always kept besides). Batched, every field gains a leading batch dimension.

    With --decode-device (device_decode.py) a worker sends, instead of the three views, ``jpeg`` the image's
    compressed bytes (or its raw RGB pixels) as a 1-D uint8 tensor, ``jpeg_info`` [6] int64 of them and ``crops``
    [3, 6] int64, the drawn crop of each view; batched, ``jpeg`` is the samples' bytes one after the other (not a
    stacked dimension: ``jpeg_info[:, 0]`` holds each one's length). These three stay on the host in ``to``: the
    decoder uploads the bytes itself and reads the crop boxes on the host. So does ``n_bad``, which the epoch counts
    on the host without reading the device.
    """
    VIEWS: ClassVar[Tuple[str, ...]] = ('image', 'aug1', 'aug2')
    FLAT: ClassVar[Tuple[str, ...]] = ('jpeg',)  # concatenated, not stacked: split by jpeg_info[:, 0]
    HOST: ClassVar[Tuple[str, ...]] = ('jpeg', 'jpeg_info', 'crops', 'n_bad')  # left on the host by ``to``

    image: Optional[torch.Tensor] = None
    text: Optional[torch.Tensor] = None
    aug1: Optional[torch.Tensor] = None
    aug2: Optional[torch.Tensor] = None
    aug_params: Optional[torch.Tensor] = None
    n_bad: Optional[torch.Tensor] = None
    image_keep: Optional[torch.Tensor] = None
    aug1_keep: Optional[torch.Tensor] = None
    aug2_keep: Optional[torch.Tensor] = None
    jpeg: Optional[torch.Tensor] = None
    jpeg_info: Optional[torch.Tensor] = None
    crops: Optional[torch.Tensor] = None

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> 'Batch':
        return dataclasses.replace(self, **{k: fn(v) for k, v in self.tensors().items()})

    def to(self, device, non_blocking: bool = False) -> 'Batch':
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors().items() if k not in self.HOST}
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> 'Batch':  # called by the DataLoader's pin-memory thread
        return self.apply(lambda t: t.pin_memory())

    def __len__(self) -> int:
        return len(next(v for k, v in self.tensors().items() if k != 'n_bad' and k not in self.FLAT))

    def chunk(self, k: int) -> List['Batch']:
        """Split into ``k`` micro-batches of equal size along the batch dimension."""
        if len(self) % k:
            raise ValueError(f'a batch of {len(self)} does not split into {k} equal micro-batches')
        parts = {name: t.chunk(k) for name, t in self.tensors().items() if name not in self.FLAT}
        if self.jpeg is not None:  # each micro-batch's bytes: the sum of its samples' lengths
            parts['jpeg'] = self.jpeg.split([int(p[:, 0].sum()) for p in parts['jpeg_info']])
        return [Batch(**{name: p[i] for name, p in parts.items()}) for i in range(k)]

    @staticmethod
    def collate(samples: Sequence['Batch'], text_pad_multiple: int = 0) -> 'Batch':
        """The DataLoader's collate_fn: stack every field of the samples (concatenate the flat ``jpeg`` bytes).
        ``text_pad_multiple`` > 0 (training's --text-pad-multiple, through ``functools.partial``): the token ids
        are cut to ``text_length`` columns, so the device learns the batch's caption length from a shape."""
        first = samples[0].tensors()
        batch = Batch(**{k: (torch.cat if k in Batch.FLAT else torch.stack)([getattr(s, k) for s in samples])
                         for k in first})
        if text_pad_multiple and batch.text is not None:
            batch.text = batch.text[:, :text_length(batch.text, text_pad_multiple)].contiguous()
        return batch

    @staticmethod
    def cat(batches: Sequence['Batch']) -> 'Batch':
        return Batch(**{k: torch.cat([getattr(b, k) for b in batches]) for k in batches[0].tensors()})


def text_length(text: torch.Tensor, multiple: int) -> int:
    """The columns a batch of token ids [B, C] (on the host) needs: its longest caption up to and including the
    end-of-text token (the largest id), rounded up to a multiple of ``multiple``, at most C (the context length,
    77). A compiler then sees a handful of text lengths (77 / multiple buckets) instead of one per batch."""
    if multiple < 1:
        raise ValueError(f'--text-pad-multiple must be >= 1, got {multiple}')
    longest = int(text.argmax(dim=-1).max()) + 1 if text.numel() else 1
    return min(text.shape[1], -(-longest // multiple) * multiple)


def keep_count(num_patches: int, mask_ratio: float) -> int:
    """Patch tokens a view keeps at ``mask_ratio``: (1 - ratio) x num_patches rounded half up, at least 1."""
    if not 0 <= mask_ratio < 1:
        raise ValueError(f'a mask ratio must be in [0, 1), got {mask_ratio}')
    return max(1, int(math.floor((1 - mask_ratio) * num_patches + 0.5)))


def draw_keep(num_patches: int, n_keep: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A uniformly random set of ``n_keep`` of ``num_patches`` patch indices, sorted: [n_keep] int64. Draws from
    torch's default generator (seeded per sample in the workers) unless ``generator`` is given."""
    return torch.randperm(num_patches, generator=generator)[:n_keep].sort().values


class ToUint8:
    """PIL image -> uint8 tensor [H, W, 3] (its own memory layout: no copy to channels-first in the worker);
    finish_views turns a batch of them into ToTensor + Normalize's [B, 3, H, W] floats on the device."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(img.convert('RGB'), dtype=np.uint8))


class CropFlipParams:
    """SimCLR views for device_augment: crop and flip here, and draw the colour and blur parameters that
    ``device_colour_blur`` applies on the device (same distributions as the PIL ops, other numerics)."""

    def __init__(self, image_size: int):
        import torchvision.transforms as T
        self.crop = T.RandomResizedCrop(image_size, scale=(0.08, 1.0))

    def __call__(self, img: Image.Image) -> Tuple[torch.Tensor, torch.Tensor]:
        img = self.crop(img)
        u = torch.rand(8)
        if u[0] < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        jitter = [float(u[1] < 0.8), *(0.6 + 0.8 * u[2:5]).tolist(), float(u[5] * 0.2 - 0.1)]  # on, b, c, s, hue
        order = torch.randperm(4).float().tolist()  # brightness, contrast, saturation, hue in a random order
        params = torch.tensor(jitter + order + [float(u[6] < 0.2), float(u[7] < 0.5), 0.1 + 1.9 * float(torch.rand(1))])
        return ToUint8()(img), params  # params: [12] = (jitter on, 4 factors, 4 order, grayscale, blur, sigma)


def build_transforms(image_size: int, image_format: str = 'float',
                     ssl_size: Optional[int] = None) -> Tuple[Callable, Callable, Callable]:
    """Returns (clip_transform, ssl_augment, val_transform) at ``image_size`` px; the SimCLR views at ``ssl_size``
    px (default ``image_size``; --ssl-view-size).

    ``image_format`` 'float' gives ImageNet-normalised tensors (the original); 'uint8' the same views as uint8
    [H, W, 3] tensors, normalised by ``finish_views`` on the device (bitwise the same result, a quarter of the bytes);
    'device_augment' leaves the SimCLR colour jitter, grayscale and blur to ``finish_views`` (other numerics).
    The val transform always gives floats.
    """
    import torchvision.transforms as T

    if image_format not in IMAGE_FORMATS:
        raise ValueError(f'image_format {image_format!r}: expected one of {IMAGE_FORMATS}')
    # views.py: torchvision's RandomResizedCrop / ColorJitter / RandomGrayscale / blur / flip draws and PIL pixels,
    # drawn before the image is decoded (so a large JPEG decodes once at a reduced scale) and cheaper to render
    finish = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]) if image_format == 'float' else \
        views.to_uint8
    clip = views.ClipView(image_size, finish, scale=(0.5, 1.0))
    ssl_size = ssl_size or image_size
    ssl = CropFlipParams(ssl_size) if image_format == 'device_augment' else views.SimCLRView(ssl_size, finish)
    val = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.ToTensor(),
                     T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return clip, ssl, val


# ----------------------------------------------------------------------------------------------------------------
# Finishing uint8 views on the device (main.py calls finish_views on every batch)
# ----------------------------------------------------------------------------------------------------------------
def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of [B, 3, H, W] in [0, 1] -> [B, 1, H, W] (the weights PIL and torchvision use)."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of [B, 3, H, W] in [0, 1] by ``shift`` [B] turns (through HSV, as PIL and torchvision do)."""
    v, imax = x.max(dim=1)
    c = v - x.min(dim=1).values  # chroma
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    r, g, b = x.unbind(1)
    sector = torch.stack([(g - b) / safe_c, 2 + (b - r) / safe_c, 4 + (r - g) / safe_c], 1).gather(1, imax[:, None])
    h = torch.where(c > 0, sector[:, 0] / 6, torch.zeros_like(c))
    h = torch.remainder(h + shift[:, None, None], 1.0) * 6  # [0, 6)
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    # back to RGB: channel n is v - v*s*clamp(min(k, 4 - k), 0, 1) with k = (n + h) mod 6, n = 5, 3, 1 for r, g, b
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + h[:, None], 6)
    return v[:, None] - (v * s)[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-image ``sigma`` [B] where ``on`` [B] (edges replicated, like PIL)."""
    B, C, H, W = x.shape
    radius = 6  # 3 sigma at the largest sigma, 2
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    k = torch.where(on[:, None], k, (t == 0).to(x.dtype)[None])  # identity kernel where off
    k = k.repeat_interleave(C, 0)  # [B*C, K]
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode='replicate'), k[:, None, None, :], groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode='replicate'), k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def _blend_step(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """One of ColorJitter's blends per image, all images at once: ``op`` [B] 0 brightness (with black), 1 contrast
    (with the mean luma), 2 saturation (with the luma), by ``factor`` [B], where ``active`` [B]. The three are
    ``lerp(base, x, f)`` with base = a luma + b mean(luma), (a, b) = (0, 0), (0, 1), (1, 0), clamped to [0, 1]; an
    image not ``active`` gets f = 1, which leaves it exactly as it was (lerp returns its end point at weight 1, and
    the clamp leaves [0, 1] alone). Three full-size operations per step."""
    gray = _gray(x)
    a, b = (op == 2).to(x.dtype).view(-1, 1, 1, 1), (op == 1).to(x.dtype).view(-1, 1, 1, 1)
    base = a * gray + b * gray.mean(dim=(1, 2, 3), keepdim=True)
    f = torch.where(active, factor, torch.ones_like(factor)).view(-1, 1, 1, 1)
    return torch.lerp(base.expand_as(x), x, f).clamp_(0, 1)


def device_colour_blur(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """SimCLR's colour jitter (0.4, 0.4, 0.4, 0.1; p=0.8, ops in a random order), grayscale (p=0.2) and Gaussian
    blur (sigma 0.1-2, p=0.5) on a batch [B, 3, H, W] in [0, 1], with each image's parameters [B, 12] drawn by
    CropFlipParams.

    A fixed number of whole-batch operations whatever the batch and its draws: each image's order has the hue shift
    at some position h; the blends before it run in three slots (positions 0-2, each image's own op where the
    position is before h), then the hue shift of every image at once, then the blends after it in three slots
    (positions 1-3). Images whose jitter is off, and slots an image has no blend in, pass unchanged (_blend_step)."""
    on = params[:, 0] > 0.5
    order = params[:, 5:9].long()  # order[:, p]: the op at position p (0-3; 3 the hue)
    hue_at = (order == 3).long().argmax(1)
    for slots, before in ((range(0, 3), True), (range(1, 4), False)):
        for p in slots:
            op = order[:, p]
            active = on & ((p < hue_at) if before else (p > hue_at))
            x = _blend_step(x, op, params.gather(1, 1 + op.clamp(max=2)[:, None]).squeeze(1), active)
        if before:
            x = torch.where(on.view(-1, 1, 1, 1), _adjust_hue(x, params[:, 4]), x)
    x = torch.where(params[:, 9].view(-1, 1, 1, 1) > 0.5, _gray(x).expand_as(x), x)
    return _gaussian_blur(x, params[:, 11], params[:, 10] > 0.5)


def finish_views(batch: 'Batch') -> 'Batch':
    """Turn a batch's uint8 views (on the device) into the model's inputs: ``/255`` and ImageNet normalisation,
    bitwise what ToTensor and Normalize give in a worker; with ``aug_params`` (--device-augment), the SimCLR colour
    jitter, grayscale and blur first. Float views (made in the worker) are left as they are."""
    done = {'aug_params': None}
    for name in Batch.VIEWS:
        x = getattr(batch, name)
        if x is None or x.dtype != torch.uint8:
            continue
        x = x.permute(0, 3, 1, 2).contiguous().float().div(255)  # [B, H, W, 3] uint8 -> [B, 3, H, W]
        if batch.aug_params is not None and name != 'image':
            x = device_colour_blur(x, batch.aug_params[:, Batch.VIEWS.index(name) - 1])
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        done[name] = x.sub_(mean).div_(std)
    return dataclasses.replace(batch, **done)
