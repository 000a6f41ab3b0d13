"""The batch's views made at once (batch_views.py, augment.device_colour_blur): the per-crop path's pixels within the
stated tolerance, and a number of tensor operations that does not grow with the batch."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import augment
import batch_views
import device_decode

VIEWS = augment.Batch.VIEWS
# batch_views' stated tolerance (its docstring): levels of uint8 pixels
MAX_VS_FLOAT, MEAN_VS_FLOAT = 1, 0.01  # against F.interpolate of each crop in float32, rounded once
MAX_VS_PIL, MEAN_VS_PIL = 2, 0.5  # against PIL (and the per-crop uint8 kernel), which round between the passes


def photo(rng, height, width):
    base = rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)
    img = np.array(Image.fromarray(base).resize((width, height), Image.BICUBIC))
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


def random_batch(n, seed=0, sizes=(37, 24, 24), max_side=150):
    """``n`` photo-like images of odd sizes and crops of every kind: down- and upsampling, thin, whole, flipped."""
    rng = np.random.default_rng(seed)
    images, crops = [], torch.zeros(n, len(VIEWS), 6, dtype=torch.int64)
    for b in range(n):
        h_img, w_img = (int(v) for v in rng.integers(9, max_side, 2))
        images.append(photo(rng, h_img, w_img))
        for v, size in enumerate(sizes):
            kind = (b + v) % 4
            if kind == 0:  # the whole image
                top, left, h, w = 0, 0, h_img, w_img
            else:
                h = int(rng.integers(1, h_img + 1)) if kind != 3 else 1
                w = int(rng.integers(1, w_img + 1))
                top, left = int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1))
            crops[b, v] = torch.tensor([top, left, h, w, (b + 2 * v) % 3 == 0, size])
    return images, crops


def per_crop_pil(images, crops, v):
    out = []
    for img, row in zip(images, crops[:, v].tolist()):
        top, left, h, w, flip, size = row
        pil = Image.fromarray(img.permute(1, 2, 0).numpy()).crop((left, top, left + w, top + h))
        pil = pil.resize((size, size), Image.BILINEAR)
        out.append(torch.from_numpy(np.array(pil.transpose(Image.FLIP_LEFT_RIGHT) if flip else pil)))
    return torch.stack(out)


def levels(a, b):
    d = (a.int() - b.int()).abs().float()
    return float(d.max()), float(d.mean())


@pytest.mark.parametrize('sizes', [(37, 24, 24), (32, 0, 0), (0, 17, 17)], ids=['slip', 'clip', 'simclr'])
def test_batched_crop_resize_equals_the_per_crop_path_within_the_stated_tolerance(sizes):
    images, crops = random_batch(24, sizes=sizes)
    got = batch_views.resize_views(batch_views.pad_images(images), crops, VIEWS)
    assert set(got) == {name for name, size in zip(VIEWS, sizes) if size}
    each_float = device_decode.crop_views_each(images, crops, uint8=False)
    each_uint8 = device_decode.crop_views_each(images, crops, uint8=True)
    for v, name in enumerate(VIEWS):
        if not sizes[v]:
            continue
        assert got[name].shape == (24, sizes[v], sizes[v], 3) and got[name].dtype == torch.uint8
        worst, mean = levels(got[name], each_float[name])
        assert worst <= MAX_VS_FLOAT and mean <= MEAN_VS_FLOAT, (name, worst, mean)
        for ref in (each_uint8[name], per_crop_pil(images, crops, v)):
            worst, mean = levels(got[name], ref)
            assert worst <= MAX_VS_PIL and mean <= MEAN_VS_PIL, (name, worst, mean)


def test_resize_weights_flip_reverses_the_rows_and_each_row_sums_to_one():
    start, length = torch.tensor([0, 5, 3]), torch.tensor([40, 7, 1])
    plain = batch_views.resize_weights(start, length, 50, 11)
    flipped = batch_views.resize_weights(start, length, 50, 11, flip=torch.tensor([1, 0, 1]))
    assert torch.equal(flipped[0], plain[0].flip(0)) and torch.equal(flipped[1], plain[1])
    torch.testing.assert_close(plain.sum(-1), torch.ones(3, 11))
    assert plain[1, :, :5].sum() == 0 and plain[1, :, 12:].sum() == 0  # nothing outside the crop


def test_device_decode_uses_the_batched_path_off_the_cpu_default():
    images, crops = random_batch(6)
    batched = device_decode.crop_views(images, crops, uint8=False)
    direct = batch_views.resize_views(batch_views.pad_images(images), crops, VIEWS)
    assert all(torch.equal(batched[k], direct[k]) for k in direct)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def views_ops(n):
    """The tensor operations of one batch's views from the padded images: crop-resize-flip, then the colour jitter,
    grayscale, blur and normalisation of augment.finish_views (every branch drawn in a batch of 8 already)."""
    images, crops = random_batch(n, seed=1, max_side=40)
    padded = batch_views.pad_images(images)
    params = torch.zeros(n, 2, 12)
    params[:, :, 0] = 1
    params[:, :, 1:5] = torch.tensor([1.2, 0.8, 1.3, 0.05])
    params[:, :, 5:9] = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i)).float()
                                     for i in range(2 * n)]).view(n, 2, 4)
    params[:, :, 9], params[:, :, 10], params[:, :, 11] = torch.arange(n)[:, None] % 3 == 0, 1, 0.7
    with OpCounter() as counter:
        views = batch_views.resize_views(padded, crops, VIEWS)
        done = augment.finish_views(augment.Batch(aug_params=params, **views))
    assert done.aug1.shape == (n, 3, 24, 24)
    return counter.count


def test_the_views_of_a_batch_take_as_many_tensor_ops_for_8_as_for_64():
    assert views_ops(8) == views_ops(64)
