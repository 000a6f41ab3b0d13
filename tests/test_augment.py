"""augment.py: the views handed over as uint8 and finished on the device, and --device-augment's batched ops."""
import argparse

import torch
from PIL import Image

import augment
import datasets


def _args(**kw):
    base = dict(dataset='coco', root='', metadata='', model='SLIP_TINY', seed=0, demo_samples=64,
                train_num_samples=None, max_bad_fraction=0.1)
    base.update(kw)
    return argparse.Namespace(**base)


def test_device_augment_views_params_and_ops(tmp_path, tokenizer, write_coco):
    meta = write_coco(tmp_path, {i: (80, 60, (40 * i + 20, 200 - 30 * i, 90)) for i in range(3)},
                      [(i, f'photo {i} of something') for i in range(3)])
    ds = datasets.get_train_dataset(_args(root=str(tmp_path), metadata=meta, image_format='device_augment'),
                                    tokenizer)
    ds.set_epoch(1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=augment.Batch.collate)))
    assert batch.image.dtype == batch.aug1.dtype == torch.uint8 and batch.aug2.shape == (len(ds), 64, 64, 3)
    assert batch.aug_params.shape == (len(ds), 2, 12)
    first, again = ds[0].tensors(), ds[0].tensors()
    assert all(torch.equal(first[k], again[k]) for k in first)  # fixed by (seed, epoch, index)
    out = augment.finish_views(batch)
    assert out.aug_params is None and out.text is batch.text and out.n_bad is batch.n_bad
    assert all(getattr(out, k).dtype == torch.float32 and getattr(out, k).shape == (3, 3, 64, 64)
               for k in augment.Batch.VIEWS)
    # the colour and blur of each SimCLR view were applied: not what plain normalisation of its uint8 pixels gives
    plain = augment.finish_views(augment.Batch(aug1=batch.aug1))
    assert not torch.allclose(plain.aug1, out.aug1)


def test_crop_flip_params_follow_simclr_distributions():
    crop = augment.CropFlipParams(64)
    img = Image.new('RGB', (80, 60), (120, 60, 30))
    p = torch.stack([crop(img)[1] for _ in range(400)])
    assert 0.7 < p[:, 0].mean() < 0.9 and 0.1 < p[:, 9].mean() < 0.3 and 0.4 < p[:, 10].mean() < 0.6
    assert p[:, 1:4].min() >= 0.6 and p[:, 1:4].max() <= 1.4 and p[:, 4].abs().max() <= 0.1
    assert (p[:, 5:9].sort(1).values == torch.arange(4.)).all() and p[:, 11].min() >= 0.1 and p[:, 11].max() <= 2


def test_device_ops_match_torchvision():
    import torchvision.transforms.v2.functional as TF
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    for shift in (-0.1, 0.0, 0.07):
        ref = torch.stack([TF.adjust_hue(xi, shift) for xi in x])
        torch.testing.assert_close(augment._adjust_hue(x, torch.full((4,), shift)), ref, atol=1e-5, rtol=0)
    q = torch.zeros(4, 12)
    q[:, 1:5] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    q[:, 5:9] = torch.tensor([3.0, 1.0, 0.0, 2.0])
    assert torch.equal(augment.device_colour_blur(x, q), x)  # everything off: unchanged
    q[:, 0], q[:, 1], q[:, 3] = 1, 1.3, 0.7  # brightness 1.3, then saturation 0.7 (order: hue, contrast, b, s)
    ref = torch.stack([TF.adjust_saturation(TF.adjust_brightness(xi, 1.3), 0.7) for xi in x])
    torch.testing.assert_close(augment.device_colour_blur(x, q), ref, atol=2e-3, rtol=0)  # luma weights differ
    q[:, 0], q[:, 10], q[:, 11] = 0, 1, 1.5
    ref = torch.stack([TF.gaussian_blur(xi, [13, 13], [1.5, 1.5]) for xi in x])
    torch.testing.assert_close(augment.device_colour_blur(x, q)[..., 6:-6, 6:-6], ref[..., 6:-6, 6:-6])
    q[:, 10], q[:, 9] = 0, 1
    gray = augment.device_colour_blur(x, q)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


