"""Demo data: a coloured shape on a muted background, drawn from its index (nothing downloaded or stored).

Pre-training pairs (``DemoSource``, captions naming colour, shape, size and place) and the held-out zero-shot sets
(``DemoZeroShotDataset``, 32 classes); ``--dataset demo`` and the catalog's ``demo`` entry.
"""
import math
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

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
