"""The image views of pre-training as a DataLoader worker makes them: SLIP's CLIP view (RandomResizedCrop, scale
0.5-1) and its SimCLR augmentation (RandomResizedCrop 0.08-1, ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8,
RandomGrayscale 0.2, Gaussian blur sigma 0.1-2 with p=0.5, horizontal flip), at the same cost in draws and less in
CPU time than the torchvision transforms they replace.

A view is drawn first (``draw(width, height)``: crop, colour, grayscale, blur and flip parameters) and rendered
after (``render(image, params)``). The draws are torchvision's, in its order, from the same streams (torch's default
generator; Python's ``random`` for the blur's sigma), so a seed gives the parameters torchvision would draw. Drawing
before decoding lets samples.PairMaker decode a large JPEG once at the DCT scale (PIL's ``draft``) that every view's
crop still covers with at least the output's pixels (``draft_scale``).

Rendering at full scale gives torchvision's pixels bitwise: the same PIL crop, resize and ImageEnhance operations,
with the hue shift computed in numpy by PIL's own RGB<->HSV arithmetic (``adjust_hue``: 2-3x cheaper than PIL's
conversions, equal on every colour) and a grayscale view blurred as one band instead of three (equal, a quarter of
the work). From a drafted image the crop box is scaled to the reduced image and resized from there (other pixels, the
same crop geometry).

References: torchvision.transforms (RandomResizedCrop.get_params, ColorJitter.get_params, the PIL functional ops),
Pillow's libImaging/Convert.c (rgb2hsv, hsv2rgb) and JpegImagePlugin.draft, SimCLR (arXiv 2002.05709).
"""
import math
import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageFilter

Crop = Tuple[int, int, int, int]  # top, left, height, width (torchvision's order)
DCT_SCALES = (8, 4, 2, 1)  # the reductions libjpeg decodes to directly


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------
class CropDraw:
    """RandomResizedCrop's parameters: torchvision's rejection sampling with its draws, without its overheads."""

    def __init__(self, scale: Tuple[float, float], ratio: Tuple[float, float] = (3 / 4, 4 / 3)):
        self.scale, self.ratio = scale, ratio
        log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision rounds them
        self.log_lo, self.log_hi = float(log_ratio[0]), float(log_ratio[1])

    def __call__(self, width: int, height: int) -> Crop:
        area = height * width
        for _ in range(10):
            target = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect = torch.exp(torch.empty(1).uniform_(self.log_lo, self.log_hi)).item()  # float32 exp, as there
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,)))
                return top, int(torch.randint(0, width - w + 1, size=(1,))), h, w
        # ten misses: the central crop of the whole image, its aspect ratio clamped to the range
        if width / height < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif width / height > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w


@dataclass
class SimCLRDraw:
    """One SimCLR view's parameters. ``jitter``: None (not applied) or (order, brightness, contrast, saturation,
    hue), ``order`` a permutation of 0-3 (brightness, contrast, saturation, hue) as ColorJitter applies them;
    ``sigma``: the blur's radius, None when not blurred."""
    crop: Crop
    jitter: Optional[Tuple[Tuple[int, ...], float, float, float, float]]
    gray: bool
    sigma: Optional[float]
    flip: bool


JITTER = (0.4, 0.4, 0.4, 0.1)  # SimCLR's ColorJitter strengths (brightness, contrast, saturation, hue)


def _rand_below(p: float) -> bool:
    """``torch.rand(1) < p`` as torchvision tests it (in float32: p rounded to float32), without a bool tensor."""
    return torch.rand(1).item() < float(np.float32(p))


def draw_simclr(crop: CropDraw, width: int, height: int, ranges: Sequence[Tuple[float, float]],
                p_jitter: float = 0.8, p_gray: float = 0.2, p_blur: float = 0.5,
                sigma: Tuple[float, float] = (0.1, 2.0)) -> SimCLRDraw:
    """Draws in the order and with the calls of torchvision's Compose([RandomResizedCrop, RandomApply([ColorJitter]),
    RandomGrayscale, RandomApply([GaussianBlur]), RandomHorizontalFlip]) (RandomApply applies unless p < rand)."""
    box = crop(width, height)
    jitter = None
    if not _rand_above(p_jitter):
        order = tuple(torch.randperm(4).tolist())
        jitter = (order, *(torch.empty(1).uniform_(lo, hi).item() for lo, hi in ranges))
    gray = _rand_below(p_gray)
    radius = None if _rand_above(p_blur) else random.uniform(*sigma)
    return SimCLRDraw(box, jitter, gray, radius, _rand_below(0.5))


def _rand_above(p: float) -> bool:
    """``p < torch.rand(1)`` in float32, as RandomApply tests it."""
    return float(np.float32(p)) < torch.rand(1).item()


def draft_scale(crops: Sequence[Tuple[Crop, int]]) -> int:
    """The largest JPEG DCT reduction (8, 4, 2 or 1) at which every (crop, output size) still has at least the
    output's pixels in each direction."""
    room = min(min(c[2], c[3]) / size for c, size in crops)
    return next((s for s in DCT_SCALES if s <= room), 1)  # 1 also when a crop is smaller than its output


# ----------------------------------------------------------------------------------------------------------------
# The hue shift: PIL's RGB -> HSV -> RGB round trip (as torchvision's adjust_hue on a PIL image), in numpy
# ----------------------------------------------------------------------------------------------------------------
_HUE_TABLES = {}


def _hue_tables():
    """Lookup tables of PIL's RGB -> HSV -> RGB arithmetic (libImaging/Convert.c, rgb2hsv and hsv2rgb).

    rgb2hsv, tabulated by PIL's own conversion: the hue depends on which channel is the largest (red first, then
    green, then blue, as PIL tests them) and on the other two channels' distances below it, (max - g, max - b),
    (max - r, max - b) or (max - r, max - g) for red, green or blue: ``hue[branch << 16 | d1 << 8 | d2]``; the
    saturation s on (chroma, max).
    hsv2rgb: with sextant i = floor(6h / 255), f = 6h / 255 - i and fs = s / 255 (float32), the largest channel is
    v, the smallest p = round(v (1 - fs)), the middle one round(v (1 - fs f)) (fs f a float32 product) in odd
    sextants and round(v (1 - fs (1 - f))) (in double) in even ones. As v = max and s depend on (chroma, max) only,
    ``sat_low[chroma << 8 | max]`` holds s | p << 8; ``mid_factor[h << 8 | s]`` the middle one's factor of v,
    rounded to float32: round(v x factor) in float32 equals PIL's double result for every (h, s, v) (checked)."""
    if not _HUE_TABLES:
        d1, d2 = np.divmod(np.arange(65536), 256)
        top = np.full(65536, 255)
        e1, e2 = np.maximum(d1, 1), np.maximum(d2, 1)  # keep the branch: red (green) must stay below the maximum
        rgb = np.concatenate([np.stack([top, 255 - d1, 255 - d2], 1), np.stack([255 - e1, top, 255 - d2], 1),
                              np.stack([255 - e1, 255 - e2, top], 1)]).astype(np.uint8)
        hsv = np.asarray(Image.fromarray(rgb.reshape(768, 256, 3), 'RGB').convert('HSV'))
        hi, lo = np.divmod(np.arange(65536), 256)
        grey = np.clip(lo - hi, 0, 255)  # (chroma, max) -> the colour (max, max - chroma, max - chroma)
        sat = Image.fromarray(np.stack([lo, grey, grey], 1).astype(np.uint8).reshape(256, 256, 3), 'RGB')
        h6 = np.arange(256, dtype=np.float64) * 6.0 / 255.0
        i, f = np.floor(h6), (h6 - np.floor(h6)).astype(np.float32)
        fs = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
        odd = (i[hi] % 2 == 1)
        g = np.where(odd, (fs[lo] * f[hi]).astype(np.float64), fs[lo].astype(np.float64) * (1.0 - f[hi]))
        sat = np.asarray(sat.convert('HSV'))[..., 1].ravel().astype(np.uint16)
        low = _round_half_up(lo * (1.0 - fs[hi].astype(np.float64)))  # low[s << 8 | v]
        _HUE_TABLES.update(hue=hsv[..., 0].ravel().copy(), sat_low=sat | (low[sat << 8 | lo].astype(np.uint16) << 8),
                           mid_factor=(1.0 - g).astype(np.float32))
    return _HUE_TABLES


def _round_half_up(x: np.ndarray) -> np.ndarray:
    """C's round() for x >= 0 (halves away from zero; numpy's round goes to even), to uint8."""
    down = np.floor(x)
    up = (x - down) >= 0.5
    return down.astype(np.uint8) + up.view(np.uint8)


def _pick(mask: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.where(mask, a, b) for uint8 arrays, by bit operations (several times cheaper)."""
    m = np.negative(mask.view(np.uint8))  # True -> 255
    return b ^ ((a ^ b) & m)


def _key16(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    key = hi.astype(np.uint16)
    key <<= 8
    key |= lo
    return key


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's adjust_hue on an RGB PIL image (the hue channel of PIL's HSV shifted by int(factor * 255)
    mod 256), with PIL's conversion arithmetic in numpy: the same pixels for every colour and shift."""
    return _image(_hue(_planes(img), factor), img.size)


def _hue(x: np.ndarray, factor: float) -> np.ndarray:
    """adjust_hue on planes [3, N] uint8."""
    t = _hue_tables()
    r, g, b = x
    top = np.maximum(np.maximum(r, g), b)
    chroma = top - np.minimum(np.minimum(r, g), b)
    not_red = r != top
    blue = g != top
    blue &= not_red
    key = (not_red.view(np.uint8) + blue.view(np.uint8)).astype(np.int32)
    key <<= 16
    key |= _key16(_pick(not_red, top - r, top - g), _pick(blue, top - g, top - b))
    h = t['hue'].take(key)
    h += np.uint8(int(factor * 255) % 256)  # torchvision: np.int32(factor * 255) (towards zero), wrapped to uint8
    sat_low = t['sat_low'].take(_key16(chroma, top))
    s, low = sat_low.astype(np.uint8), (sat_low >> 8).astype(np.uint8)
    mid = t['mid_factor'].take(_key16(h, s))
    mid *= top.astype(np.float32)
    mid += np.float32(0.5)
    mid = mid.astype(np.uint8)  # C's round() (halves up; non-negative): truncation of + 0.5
    i = h.astype(np.uint16)
    i *= 6
    i //= 255
    i = i.astype(np.uint8)  # 0-6; 6 is sextant 0
    i -= (i == 6).view(np.uint8) * np.uint8(6)
    at_top = i + np.uint8(1)  # the channel holding v: red in sextants 5 and 0, green in 1 and 2, blue in 3 and 4
    at_top -= (at_top == 6).view(np.uint8) * np.uint8(6)
    at_top >>= 1
    at_low = i + np.uint8(4)  # the channel holding p: red in 2 and 3, green in 4 and 5, blue in 0 and 1
    at_low -= (at_low >= 6).view(np.uint8) * np.uint8(6)
    at_low >>= 1
    return np.stack([_pick(at_top == c, top, _pick(at_low == c, low, mid)) for c in range(3)])


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------
def resized_crop(img: Image.Image, crop: Crop, size: int, reduced: int = 1) -> Image.Image:
    """The crop (in the full image's pixels) resized to size x size, bilinear with PIL's antialiasing. From an image
    decoded at 1/``reduced`` of its size (draft) the box is scaled to it: the same region, resized from there."""
    top, left, h, w = crop
    if reduced == 1:
        return img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)  # torchvision's
    box = (left / reduced, top / reduced, (left + w) / reduced, (top + h) / reduced)
    return img.resize((size, size), Image.BILINEAR, box=box)


def _planes(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 planes [3, H * W]."""
    return np.stack([np.frombuffer(img.tobytes('raw', band), np.uint8) for band in 'RGB'])


def _image(x: np.ndarray, size: Tuple[int, int]) -> Image.Image:
    """uint8 planes [3, H * W] -> RGB PIL image."""
    return Image.merge('RGB', [Image.frombuffer('L', size, np.ascontiguousarray(p), 'raw', 'L', 0, 1) for p in x])


def _luma(x: np.ndarray) -> np.ndarray:
    """PIL's RGB -> 'L' (libImaging/Convert.c rgb2l: (19595 r + 38470 g + 7471 b + 2^15) >> 16) of float32 planes
    [3, N] holding 0-255: exact in float32 (every partial sum is an integer below 2^24)."""
    y = x[0] * np.float32(19595)
    y += x[1] * np.float32(38470)
    y += x[2] * np.float32(7471)
    y += np.float32(0x8000)
    y *= np.float32(1 / 65536)
    return np.floor(y, out=y)


def _blend(x: np.ndarray, base, factor: float) -> np.ndarray:
    """PIL's Image.blend(base, x, factor) (libImaging/Blend.c) in place on float32 planes [3, N] holding 0-255:
    base + factor (x - base) in float32, clipped to 0-255 when extrapolating, truncated; ``base`` a number or a
    plane [N] shared by the channels."""
    if isinstance(base, np.ndarray) or base:
        x -= base
        x *= np.float32(factor)
        x += base
    else:  # with black: 0 + factor x
        x *= np.float32(factor)
    if not 0 <= factor <= 1:
        np.clip(x, 0, 255, out=x)
    return np.trunc(x, out=x)


def _contrast(x: np.ndarray, factor: float) -> np.ndarray:
    """ImageEnhance.Contrast: a blend with the mean of the 'L' image, rounded half up (ImageStat's mean)."""
    return _blend(x, np.float32(int(float(_luma(x).sum(dtype=np.float64)) / x.shape[1] + 0.5)), factor)


def _hue_float(x: np.ndarray, factor: float) -> np.ndarray:
    return _hue(x.astype(np.uint8), factor).astype(np.float32)


# ColorJitter's four operations on float32 planes [3, N] holding 0-255 (ImageEnhance's Brightness, Contrast, Color;
# the hue shift)
JITTER_STEPS = (lambda x, f: _blend(x, np.float32(0), f), _contrast, lambda x, f: _blend(x, _luma(x), f),
                _hue_float)


def jitter(img: Image.Image, order: Sequence[int], brightness: float, contrast: float, saturation: float,
           hue: float) -> Image.Image:
    """torchvision's ColorJitter with drawn factors on a PIL image, in ``order`` (0 brightness, 1 contrast,
    2 saturation, 3 hue), on numpy planes with PIL's arithmetic: ImageEnhance's blends with black, with the mean of
    the 'L' image and with the 'L' image, and PIL's HSV hue shift (``JITTER_STEPS``)."""
    x, factors = _float_planes(img), (brightness, contrast, saturation, hue)
    for op in order:
        x = JITTER_STEPS[op](x, factors[op])
    return _float_image(x, img.size)


def _float_planes(img: Image.Image) -> np.ndarray:
    return _planes(img).astype(np.float32)


def _float_image(x: np.ndarray, size: Tuple[int, int]) -> Image.Image:
    return _image(x.astype(np.uint8), size)


def gray_blur(img: Image.Image, gray: bool, sigma: Optional[float]) -> Image.Image:
    """RandomGrayscale (3 equal channels of PIL's 'L') then PIL's Gaussian blur of radius ``sigma``; a grayscale
    view is blurred as its one band (the same pixels: PIL blurs each channel alike)."""
    if gray:
        band = img.convert('L')
        if sigma is not None:
            band = band.filter(ImageFilter.GaussianBlur(radius=sigma))
        return Image.merge('RGB', (band, band, band))
    return img if sigma is None else img.filter(ImageFilter.GaussianBlur(radius=sigma))


def to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 [H, W, 3] (augment.ToUint8's layout)."""
    return torch.from_numpy(np.array(img if img.mode == 'RGB' else img.convert('RGB'), dtype=np.uint8))


class ClipView:
    """SLIP's CLIP view: RandomResizedCrop(size, scale) then ``finish`` (ToTensor + Normalize, or to_uint8)."""

    def __init__(self, size: int, finish: Callable, scale: Tuple[float, float] = (0.5, 1.0)):
        self.size, self.finish, self.draw_crop = size, finish, CropDraw(scale)

    def draw(self, width: int, height: int) -> Crop:
        return self.draw_crop(width, height)

    def crops(self, params: Crop) -> Tuple[Tuple[Crop, int], ...]:
        return ((params, self.size),)

    def render(self, img: Image.Image, params: Crop, reduced: int = 1) -> torch.Tensor:
        return self.finish(resized_crop(img, params, self.size, reduced))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.render(img, self.draw(*img.size))


class SimCLRView:
    """SimCLR's augmentation as SLIP applies it: crop (0.08-1), colour jitter 0.4/0.4/0.4/0.1 (p=0.8), grayscale
    (p=0.2), Gaussian blur sigma 0.1-2 (p=0.5), horizontal flip, then ``finish``."""

    def __init__(self, size: int, finish: Callable):
        import torchvision.transforms as T
        self.size, self.finish, self.draw_crop = size, finish, CropDraw((0.08, 1.0))
        cj = T.ColorJitter(*JITTER)  # its factor ranges, exactly as torchvision computes them
        self.ranges = [tuple(cj.brightness), tuple(cj.contrast), tuple(cj.saturation), tuple(cj.hue)]

    def draw(self, width: int, height: int) -> SimCLRDraw:
        return draw_simclr(self.draw_crop, width, height, self.ranges)

    def crops(self, params: SimCLRDraw) -> Tuple[Tuple[Crop, int], ...]:
        return ((params.crop, self.size),)

    def render(self, img: Image.Image, p: SimCLRDraw, reduced: int = 1) -> torch.Tensor:
        img = resized_crop(img if img.mode == 'RGB' else img.convert('RGB'), p.crop, self.size, reduced)
        if p.jitter is not None:
            img = jitter(img, *p.jitter)
        img = gray_blur(img, p.gray, p.sigma)
        if p.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return self.finish(img)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.render(img, self.draw(*img.size))
