"""Every view of a batch cropped, resized and flipped at once: a few tensor operations however large the batch.

``resize_views(images, crops, names)`` takes the batch's decoded images padded into one tensor (``pad_images``:
float 0-255, each image in its top-left corner) and the drawn crops [B, V, 6] (device_decode.CROP_FIELDS: top, left, height, width, flip, output size; size 0: no such view) and
returns each view as uint8 [B, S, S, 3].

How: PIL's antialiased bilinear resize (the filter torchvision's RandomResizedCrop uses on a PIL image, and
``F.interpolate(antialias=True)``) is separable, each output pixel a weighted sum of the input pixels under a
triangle stretched by the scale factor, with the weights cut at the crop's edges and normalised to sum to one
(Pillow's libImaging/Resample.c, precompute_coeffs). Written as matrices, a crop's resize is ``Wy @ image @ Wx^T``
with Wy [S, H] and Wx [S, W] zero outside the crop's rows and columns: all the crops of a view are then one batched
matrix product per axis, and a horizontal flip is Wx's rows reversed. The work is that of dense products over the
padded images (about 2 x 3 x S x H x W multiply-adds per view and image: 0.5 GFLOP for 500x375 at 224 px), which a
GPU does in a few milliseconds for 256 samples and a CPU much slower than the per-crop kernels (``bench.py data``).

Tolerance against the per-crop path (``F.interpolate`` of each crop, and PIL): the same weights in float32 summed
in another order, rounded once at the end; PIL rounds to uint8 between its two passes. At most 2 levels apart from
PIL's and from the per-crop uint8 kernel, at most 1 from the per-crop float path, means below 0.5 level
(tests/test_batch_views.py).
"""
from typing import Dict, Sequence

import torch

CROP_TOP, CROP_LEFT, CROP_H, CROP_W, CROP_FLIP, CROP_SIZE = range(6)


def resize_weights(start: torch.Tensor, length: torch.Tensor, full: int, size: int,
                   flip: torch.Tensor = None) -> torch.Tensor:
    """The antialiased bilinear weights of resizing the segments [start, start + length) of an axis of ``full``
    pixels to ``size`` pixels: [N, size, full] float32, each row summing to one over the segment (reversed rows where
    ``flip``). ``start``, ``length`` and ``flip`` are [N] tensors on the device the weights are made on."""
    start, length = start.float(), length.float()
    scale = length / size  # input pixels per output pixel
    support = scale.clamp(min=1.0)  # the triangle's half-width: stretched when downsampling (antialias)
    out = torch.arange(size, device=start.device, dtype=torch.float32)
    centre = start[:, None] + (out[None] + 0.5) * scale[:, None]  # [N, size], in input pixels
    pixel = torch.arange(full, device=start.device, dtype=torch.float32) + 0.5  # input pixel centres
    w = (1 - ((pixel[None, None] - centre[..., None]) / support[:, None, None]).abs()).clamp_(min=0)
    inside = (pixel[None] > start[:, None]) & (pixel[None] < (start + length)[:, None])  # [N, full]
    w = w * inside[:, None]
    w = w / w.sum(-1, keepdim=True).clamp_(min=1e-12)
    if flip is not None:
        w = torch.where(flip.bool()[:, None, None], w.flip(1), w)
    return w


def resize_views(images: torch.Tensor, crops: torch.Tensor, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """{name: uint8 [B, S, S, 3]} for each view ``v`` (``names[v]``) whose crops [B, V, 6] have a size; ``images``
    from ``pad_images``: float [B, H, 3, W] holding 0-255, each image's rows of channel planes (the crops never
    reach the padding); ``crops`` on the host (the output sizes are read there; the rest is copied to the images'
    device). Two batched matrix products per view, no broadcast copies."""
    if crops.device.type != 'cpu':
        raise ValueError('resize_views reads the views\' output sizes on the host: pass the crops on the CPU')
    B, H, C, W = images.shape
    sizes = crops[0, :, CROP_SIZE].tolist()
    crops = crops.to(images.device, non_blocking=True)
    rows_of_planes = images.view(B, H, C * W)
    out = {}
    for v, name in enumerate(names):
        size = int(sizes[v])
        if not size:
            continue
        c = crops[:, v]
        wy = resize_weights(c[:, CROP_TOP], c[:, CROP_H], H, size)  # [B, S, H]
        wx = resize_weights(c[:, CROP_LEFT], c[:, CROP_W], W, size, flip=c[:, CROP_FLIP])  # [B, S, W]
        x = torch.bmm(wy, rows_of_planes)  # [B, S, C W]: the rows
        x = torch.bmm(x.view(B, size * C, W), wx.transpose(1, 2))  # [B, S C, S]: the columns
        out[name] = x.round_().clamp_(0, 255).to(torch.uint8).view(B, size, C, size).permute(0, 1, 3, 2)
    return out


def pad_images(images: Sequence[torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    """uint8 images [3, H_i, W_i] -> one tensor [B, max H, 3, max W] of ``dtype`` (rows of channel planes: the layout
    resize_views multiplies without copies) with each image in its top-left corner (zeros elsewhere; the crops never
    reach them). One copy per image: the decoder's output, gathered."""
    H, W = max(int(i.shape[1]) for i in images), max(int(i.shape[2]) for i in images)
    out = torch.zeros(len(images), H, 3, W, dtype=dtype, device=images[0].device)
    for b, img in enumerate(images):
        out[b, :img.shape[1], :, :img.shape[2]] = img.permute(1, 0, 2)
    return out
