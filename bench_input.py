"""The main-process side of --decode-device, measured: its stages apart, its overlap with a step, its pixels against
PIL's per JPEG kind, and the decoder's race with queued kernels.

``stage_rows(batches, dataset, device, decode_device)`` (bench.py data --decode-device adds it to the decode row):
device milliseconds per 256 samples of the decode, of the crops (batched, batch_views.py, and crop by crop, as
before) and of the colour jitter, grayscale, blur and normalisation; and, on CUDA, how much of the preparation of
a batch hid behind a step running on the training stream (train_data.DeviceBatches' side stream; a synthetic step
of matrix products as long as the preparation).

GPU probes (bench_gpu.sh runs them; each prints one JSON line per result):
    python bench_input.py kinds          # mean and max |pixel - PIL's| per JPEG kind and decoder
    python bench_input.py race --tries 200
``race``: vision pull request 9606's hazard. On one stream: a long kernel (torch.cuda._sleep), then a copy that
reads a tensor, then that tensor freed (its memory returns to the stream's pool at once), then a batch decoded on
the same stream. A decoder that starts before the queued kernels ran may write into the freed memory before the
copy read it: the copy then differs from the tensor's value. Counted over ``--tries`` for our decode (the stream
synchronised first: jpeg_decoders.py) and for torchvision's decode_jpeg called bare.
"""
import argparse
import io
import json
import os
import time
from typing import Dict, List

import numpy as np
import torch

import augment
import device_decode
import jpeg_decoders
import train_data


def _timer(device):
    """() -> seconds since the last call, the device's queued work included."""
    state = {'t': None}

    def lap():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        now, last = time.perf_counter(), state['t']
        state['t'] = now
        return 0.0 if last is None else now - last
    lap()
    return lap


def stage_rows(batches: List[augment.Batch], dataset, device: torch.device, decode_device: str) -> Dict:
    """Device ms per 256 samples of each stage of finishing ``batches`` (batches of bytes and crops), medians of 3
    passes; ``overlap``: the share of the preparation hidden behind a step (CUDA), None on the CPU (no streams)."""
    device = torch.device(device)
    dec = device_decode._decoder_device(decode_device, device)
    n = sum(len(b) for b in batches)
    names = ('decode', 'crops_batched', 'crops_per_crop', 'colour_blur')
    spent = {k: [] for k in names}
    for _ in range(3):
        total = dict.fromkeys(names, 0.0)
        for b in batches:
            lap = _timer(device)
            images = [img.to(device) for img in device_decode.decode_images(b, dec, dataset)]
            total['decode'] += lap()
            views = device_decode.crop_views(images, b.crops, uint8=False)
            total['crops_batched'] += lap()
            device_decode.crop_views_each(images, b.crops, uint8=device.type == 'cpu')
            total['crops_per_crop'] += lap()
            rest = b.to(device)
            augment.finish_views(augment.Batch(aug_params=rest.aug_params, **views))
            total['colour_blur'] += lap()
        for k in names:
            spent[k].append(total[k])
    row = {f'{k}_ms_per_256': float(np.median(spent[k])) / n * 256e3 for k in names}
    row['per_crop_kind'] = 'uint8 kernel' if device.type == 'cpu' else 'float'
    row['overlap'] = overlap(batches, dataset, device, decode_device) if device.type == 'cuda' else None
    return row


def overlap(batches, dataset, device, decode_device) -> float:
    """(step alone + preparation alone - both together) / min(the two): 1 when the shorter one hid entirely."""
    prep = train_data.DeviceBatches(batches, device, decode_device, dataset)
    x = torch.randn(4096, 4096, device=device)

    def step(k):
        for _ in range(k):
            torch.mm(x, x)

    def timed(fn):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - t

    list(prep)  # warm up: the decoder, the allocator
    t_prep = timed(lambda: list(prep))
    t_one = timed(lambda: step(10)) / 10
    k = max(1, int(t_prep / len(batches) / t_one))  # a step as long as one batch's preparation
    t_step = timed(lambda: step(k * len(batches)))

    def both():
        for _ in prep:  # the next batch is prepared on the side stream while this "step" runs
            step(k)
    t_both = timed(both)
    return (t_prep + t_step - t_both) / min(t_prep, t_step)


# ----------------------------------------------------------------------------------------------------------------
# GPU probes
# ----------------------------------------------------------------------------------------------------------------
def jpeg_kinds(size=(500, 375)) -> Dict[str, bytes]:
    """Photo-like JPEGs of the kinds crawls hold (the 2026-12-04 nvJPEG probe's content)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (47, 63, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)

    def enc(img, **kw):
        buf = io.BytesIO()
        img.save(buf, format='JPEG', quality=90, **kw)
        return buf.getvalue()
    return {'420': enc(base), '422': enc(base, subsampling=1), '444': enc(base, subsampling=0),
            'progressive_420': enc(base, progressive=True), 'grayscale': enc(base.convert('L')),
            'cmyk': enc(base.convert('CMYK')), 'odd_333x251_420': enc(base.resize((333, 251)))}


def probe_kinds(device) -> List[Dict]:
    """Mean and max |decoded - PIL's RGB| per kind, for each decoder on ``device`` (nvImageCodec if installed,
    torchvision). A kind the workers decode themselves (CMYK: not sent as bytes) is reported as such too."""
    from PIL import Image
    rows = []
    for which in ('nvimgcodec', 'torchvision'):
        os.environ['SLIP_JPEG_DECODER'] = which
        jpeg_decoders._DECODERS.clear()
        decode = jpeg_decoders.jpeg_decoder(device)
        name = 'nvimgcodec' if isinstance(decode, jpeg_decoders.NvImageCodec) else 'torchvision'
        if name != which:
            rows.append({'probe': 'kinds', 'decoder': which, 'available': False})
            continue
        for kind, data in jpeg_kinds().items():
            with Image.open(io.BytesIO(data)) as img:
                ref = torch.from_numpy(np.array(img.convert('RGB'))).permute(2, 0, 1)
                sent = img.mode in device_decode.JPEG_MODES
            try:
                out = decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)], device)[0]
            except Exception as e:  # report, do not stop: the next kinds still say something
                out = f'{type(e).__name__}: {str(e)[:80]}'
            row = {'probe': 'kinds', 'decoder': name, 'kind': kind, 'sent_as_bytes': sent}
            if isinstance(out, torch.Tensor) and out.shape == ref.shape:
                d = (out.cpu().int() - ref.int()).abs().float()
                row.update(mean_levels=float(d.mean()), max_levels=float(d.max()))
            else:
                row['result'] = out if isinstance(out, str) else ('None' if out is None else list(out.shape))
            rows.append(row)
    os.environ.pop('SLIP_JPEG_DECODER')
    jpeg_decoders._DECODERS.clear()
    return rows


def probe_race(device, tries: int) -> List[Dict]:
    """vision pull request 9606's check (module docstring): corrupted reads out of ``tries``, per decode call."""
    from torchvision.io import ImageReadMode, decode_jpeg
    data = torch.frombuffer(bytearray(jpeg_kinds()['420']), dtype=torch.uint8)
    batch = [data] * 8
    stream = torch.cuda.Stream(device)
    calls = {'ours': lambda: jpeg_decoders.jpeg_decoder(device)(batch, device),
             'torchvision_bare': lambda: decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)}
    rows = []
    for name, call in calls.items():
        corrupted = 0
        with torch.cuda.stream(stream):
            call()  # warm up
            for _ in range(tries):
                victim = torch.full((3, 375, 500), 7, dtype=torch.uint8, device=device)  # a decoded image's size
                torch.cuda._sleep(2_000_000)  # the queued work the decoder must not overtake
                read = victim.clone()  # queued: reads the victim after the sleep
                del victim  # its memory is back in the stream's pool, free for the decoder's outputs
                out = call()
                stream.synchronize()
                corrupted += int((read != 7).any())
                del out, read
        ours = jpeg_decoders.jpeg_decoder(device)
        decoder = ('nvimgcodec' if isinstance(ours, jpeg_decoders.NvImageCodec) else 'torchvision') + ' + sync' \
            if name == 'ours' else 'torchvision decode_jpeg, no sync'
        rows.append({'probe': 'race', 'decode': decoder, 'tries': tries, 'corrupted': corrupted})
    return rows


def main():
    p = argparse.ArgumentParser('the --decode-device probes on a GPU')
    p.add_argument('probe', choices=['kinds', 'race'])
    p.add_argument('--tries', default=200, type=int)
    p.add_argument('--device', default='cuda')
    args = p.parse_args()
    device = torch.device(args.device)
    rows = probe_kinds(device) if args.probe == 'kinds' else probe_race(device, args.tries)
    for row in rows:
        print(json.dumps(row))


if __name__ == '__main__':
    main()
