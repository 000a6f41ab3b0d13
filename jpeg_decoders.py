"""Batched JPEG decoding for --decode-device: libjpeg on the CPU, nvImageCodec or torchvision's nvJPEG on a GPU.

``jpeg_decoder(device)`` gives a callable ``(list of 1-D uint8 CPU tensors of JPEG bytes, device) -> list of uint8
[3, H, W] tensors on the device, None where an image could not be decoded`` (device_decode then decodes it with PIL,
as the per-sample path does, or replaces it).

  * CPU: ``torchvision.io.decode_jpeg`` (libjpeg-turbo, the library PIL uses: PIL's pixels).
  * CUDA, with nvImageCodec installed (``pip install nvidia-nvimgcodec-cu13``, an optional dependency imported only
    here): its batched decoder with libjpeg's "fancy" chroma upsampling (option ``:fancy_upsampling=1``) and without
    EXIF rotation (PIL does not rotate either). The decode is put on the current CUDA stream; the decoded images'
    own memory, and the bytes, are kept alive until the next batch's decode, which first synchronises the stream
    (see below), so nothing queued still reads them when they go.
  * CUDA without it: torchvision's batched nvJPEG decode, whose 4:2:0 chroma is upsampled without libjpeg's
    interpolation (6 levels from PIL's pixels on average on photo-like 4:2:0 JPEGs, measured on an H200:
    ../shared/gpu/README.md); logged once.
``SLIP_JPEG_DECODER=torchvision`` picks the second on a machine with both (bench_gpu_data.py compares them).

The decode on CUDA starts with a synchronisation of the current stream: nvJPEG's hardware engine (A100, H100, H200)
does not wait for work already queued on the stream it is given, so without it the decoder may write into memory
that queued kernels still read, memory PyTorch's caching allocator handed out again (pytorch/vision pull request
9606; torchcodec pull request 1634 adds the same synchronisation). Called on train_data.DeviceBatches' own stream,
this waits only for that stream's previous batch, not for the training step.
"""
import os
from typing import Callable, List, Optional, Sequence

import torch

from utils import logger

_DECODERS = {}


def _torchvision(chunks: Sequence[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
    from torchvision.io import ImageReadMode, decode_jpeg
    if device.type == 'cuda':
        torch.cuda.current_stream(device).synchronize()  # see the module docstring (vision pull request 9606)
    try:
        return list(decode_jpeg(list(chunks), mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one or more bad ones: image by image
        return [_one(c, device) for c in chunks]


def _one(data: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


class NvImageCodec:
    """nvImageCodec's batched decoder on one GPU, with libjpeg's chroma upsampling."""

    def __init__(self, device: torch.device):
        from nvidia import nvimgcodec  # optional: ImportError when not installed
        self.nv, self.alive = nvimgcodec, []
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.decoder = nvimgcodec.Decoder(device_id=index, options=':fancy_upsampling=1')
        self.params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB)

    def __call__(self, chunks: Sequence[torch.Tensor], device: torch.device) -> List[Optional[torch.Tensor]]:
        stream = torch.cuda.current_stream(device)
        stream.synchronize()  # see the module docstring; the previous batch's images are now free to go
        streams = [self.nv.CodeStream(c.numpy()) for c in chunks]
        decoded = self.decoder.decode(streams, params=self.params, cuda_stream=stream.cuda_stream)
        self.alive = (decoded, streams, chunks)  # the outputs are read, the inputs may be, by work queued on ``stream``
        out = []
        for img in decoded:
            if img is None:
                out.append(None)
                continue
            x = torch.as_tensor(img, device=device)  # [H, W, C] uint8, no copy
            out.append((x.expand(-1, -1, 3) if x.shape[-1] == 1 else x).permute(2, 0, 1))
        return out


def jpeg_decoder(device: torch.device) -> Callable:
    """The batched decoder for ``device`` (see the module docstring); which one runs is logged once per device."""
    device = torch.device(device)
    if device.type != 'cuda':
        return _torchvision
    key = str(device)
    if key not in _DECODERS:
        _DECODERS[key] = _torchvision
        if os.environ.get('SLIP_JPEG_DECODER', 'nvimgcodec') != 'torchvision':
            try:
                _DECODERS[key] = NvImageCodec(device)
            except ImportError:
                pass
        if _DECODERS[key] is _torchvision:
            logger.warning('--decode-device cuda: JPEGs decoded by torchvision\'s nvJPEG call, whose 4:2:0 chroma '
                           'differs from PIL\'s (about 6 levels on average); pip install nvidia-nvimgcodec-cu13 for '
                           'libjpeg\'s pixels (README, "Input on the GPU")')
        else:
            logger.info('--decode-device cuda: JPEGs decoded by nvImageCodec with libjpeg\'s chroma upsampling')
    return _DECODERS[key]
