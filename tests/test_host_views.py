"""views.py, the host views: torchvision's draws and pixels bitwise at full scale (crops, colour jitter with the
numpy hue shift, grayscale, blur, flip), crop statistics equal to RandomResizedCrop's, JPEG draft decoding of large
images (the same crop geometry, close pixels), and the decode-in-make path of bad images."""
import io
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

import augment
import bench_original
import samples
import views


def _photo(size=(500, 375), seed=0) -> Image.Image:
    """Smooth, colourful content (upsampled noise), as bench_data's fixture makes."""
    base = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.BICUBIC)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format='JPEG', quality=90)
    return buf.getvalue()


def _reference(size, fmt):
    """The transforms views.py replaces: torchvision's, as augment.build_transforms composed them before."""
    clip, ssl = bench_original.original_transforms(size)
    if fmt == 'uint8':
        clip = T.Compose([*clip.transforms[:-2], augment.ToUint8()])
        ssl = T.Compose([*ssl.transforms[:-2], augment.ToUint8()])
    return clip, ssl


def _seeded(seed, fn, *args):
    torch.manual_seed(seed)
    random.seed(seed)
    out = fn(*args)
    return out, torch.rand(1), random.random()  # the streams after: the same draws were taken


@pytest.mark.parametrize('fmt', ['float', 'uint8'])
def test_views_equal_torchvision_transforms_bitwise_and_draw_the_same_numbers(fmt):
    images = [_photo(), _photo((120, 200), 1), _photo((40, 30), 2), _photo((300, 20), 3)]  # small: upsampled, fallback
    clip, ssl, _ = augment.build_transforms(64, fmt)
    ref_clip, ref_ssl = _reference(64, fmt)
    for seed in range(60):
        img = images[seed % len(images)]
        for ours, ref in ((clip, ref_clip), (ssl, ref_ssl)):
            got, want = _seeded(seed, ours, img), _seeded(seed, ref, img)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2], seed


def test_views_of_a_grayscale_or_rgba_image_are_rgb():
    clip, ssl, _ = augment.build_transforms(32, 'uint8')
    for mode in ('L', 'RGBA', 'P'):
        img = _photo((40, 30)).convert(mode)
        assert clip(img).shape == ssl(img).shape == (32, 32, 3)


def test_simclr_draws_cover_every_branch_with_torchvision_probabilities():
    view = views.SimCLRView(64, views.to_uint8)
    torch.manual_seed(0)
    random.seed(0)
    draws = [view.draw(500, 375) for _ in range(4000)]
    jittered = [d.jitter for d in draws if d.jitter is not None]
    assert abs(len(jittered) / 4000 - 0.8) < 0.03 and abs(np.mean([d.gray for d in draws]) - 0.2) < 0.03
    assert abs(np.mean([d.sigma is not None for d in draws]) - 0.5) < 0.03
    assert abs(np.mean([d.flip for d in draws]) - 0.5) < 0.03
    sigmas = [d.sigma for d in draws if d.sigma is not None]
    assert 0.1 <= min(sigmas) and max(sigmas) <= 2.0
    factors = np.array([j[1:] for j in jittered])
    assert factors[:, :3].min() >= 0.6 and factors[:, :3].max() <= 1.4 and np.abs(factors[:, 3]).max() <= 0.1
    assert len({j[0] for j in jittered}) == 24  # every order of the four colour ops


def test_adjust_hue_equals_torchvision_for_every_shift_on_a_colour_grid():
    # 52^3 colours (each channel in steps of 5, with 0 and 255) at all 51 shifts int(factor * 255) in -25..25;
    # every one of the 2^24 colours at every shift: the slow test below
    levels = np.arange(0, 256, 5)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing='ij'), -1).reshape(-1, 3).astype(np.uint8)
    img = Image.fromarray(grid.reshape(len(levels) ** 2, len(levels), 3))
    for k in range(-25, 26):
        factor = k / 255 + (1e-9 if k >= 0 else -1e-9)
        assert int(np.int32(factor * 255)) == k
        assert np.array_equal(np.asarray(views.adjust_hue(img, factor)), np.asarray(TF.adjust_hue(img, factor))), k


def test_luma_equals_pil_convert_l_for_every_colour():
    for chunk in range(4):  # 2^22 colours at a time
        c = np.arange(chunk << 22, (chunk + 1) << 22, dtype=np.uint32)
        rgb = np.stack([(c >> 16) & 255, (c >> 8) & 255, c & 255]).astype(np.uint8)
        want = np.asarray(Image.fromarray(np.ascontiguousarray(rgb.T).reshape(2048, 2048, 3)).convert('L'))
        assert np.array_equal(views._luma(rgb.astype(np.float32)), want.ravel())


def test_blend_equals_pil_blend_for_every_base_and_value():
    values = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # row: base m, column: value v
    img, base = Image.fromarray(np.stack([values] * 3, -1)), Image.fromarray(np.stack([values.T] * 3, -1))
    planes, bases = np.stack([values.ravel()] * 3), values.T.ravel().copy()
    factors = [0.6, 1.0, 1.4, 0.99999994, 1.0000001, 0.0, 2.0, *np.random.default_rng(0).uniform(0.6, 1.4, 60)]
    for f in factors:  # interpolation (0-1) and extrapolation (clipped) branches
        want = np.asarray(Image.blend(base, img, float(f)))[..., 0].ravel()
        got = views._blend(planes.astype(np.float32), bases.astype(np.float32), float(f))
        assert np.array_equal(got[0], want), f
        black = np.asarray(Image.blend(Image.new('RGB', img.size, 0), img, float(f)))[..., 0].ravel()
        assert np.array_equal(views._blend(planes.astype(np.float32), np.float32(0), float(f))[0], black), f


def test_jitter_ops_one_by_one_equal_torchvision():
    img = _photo((64, 48), 4)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op, factor in ((0, 0.61), (0, 1.37), (1, 0.64), (1, 1.33), (2, 0.7), (2, 1.4), (3, -0.09), (3, 0.004)):
        factors = [1.0, 1.0, 1.0, 0.0]
        factors[op] = factor
        got = views.jitter(img, (op,), *factors)
        assert np.array_equal(np.asarray(got), np.asarray(ops[op](img, factor))), (op, factor)


def test_hue_middle_value_in_float32_equals_pils_double_rounding_for_every_h_s_v():
    factor32 = views._hue_tables()['mid_factor']  # [h << 8 | s], float32
    h6 = np.arange(256, dtype=np.float64) * 6.0 / 255.0
    f = (h6 - np.floor(h6)).astype(np.float32)
    fs = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
    h, s = np.divmod(np.arange(65536), 256)
    odd = np.floor(h6)[h] % 2 == 1
    factor64 = 1.0 - np.where(odd, (fs[s] * f[h]).astype(np.float64), fs[s].astype(np.float64) * (1.0 - f[h]))
    v = np.arange(256, dtype=np.float64)
    for block in range(0, 65536, 4096):
        y = factor64[block:block + 4096, None] * v  # C: round((float)v * (1.0 - ...)), halves away from zero
        want = np.floor(y) + ((y - np.floor(y)) >= 0.5)
        got = (factor32[block:block + 4096, None] * v.astype(np.float32) + np.float32(0.5)).astype(np.uint8)
        assert np.array_equal(got, want)


@pytest.mark.slow
def test_adjust_hue_equals_torchvision_for_every_colour():
    # every colour at the extreme, the smallest and no shift (all 51 shifts x 2^24 colours: 0 pixels differ, 70 s)
    colours = np.arange(1 << 24, dtype=np.uint32)
    for chunk in range(16):
        c = colours[chunk << 20:(chunk + 1) << 20]
        img = Image.fromarray(np.stack([(c >> 16) & 255, (c >> 8) & 255, c & 255], -1).astype(np.uint8)
                              .reshape(1024, 1024, 3))
        for k in (-25, -1, 0, 1, 25):
            factor = k / 255 + (1e-9 if k >= 0 else -1e-9)
            assert np.array_equal(np.asarray(views.adjust_hue(img, factor)), np.asarray(TF.adjust_hue(img, factor)))


def test_grayscale_then_blur_on_one_band_equals_torchvision():
    img = _photo((64, 48))
    for gray in (False, True):
        for sigma in (None, 0.1, 0.7, 2.0):
            want = TF.rgb_to_grayscale(img, 3) if gray else img
            want = want if sigma is None else want.filter(ImageFilter.GaussianBlur(radius=sigma))
            assert np.array_equal(np.asarray(views.gray_blur(img, gray, sigma)), np.asarray(want))


def test_crop_draws_equal_torchvision_get_params():
    draw = views.CropDraw((0.08, 1.0))
    for size in ((500, 375), (1600, 1200), (37, 300), (3, 2)):
        blank = Image.new('L', size)
        for seed in range(50):
            torch.manual_seed(seed)
            want = T.RandomResizedCrop.get_params(blank, [0.08, 1.0], [3 / 4, 4 / 3])
            torch.manual_seed(seed)
            assert draw(*size) == tuple(want)


def _ks_statistic(a, b):
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    both = np.sort(np.concatenate([a, b]))
    return np.abs(np.searchsorted(np.sort(a), both, 'right') / len(a) -
                  np.searchsorted(np.sort(b), both, 'right') / len(b)).max()


@pytest.mark.parametrize('size', [(500, 375), (1600, 1200)])
@pytest.mark.parametrize('scale', [(0.08, 1.0), (0.5, 1.0)])
def test_crop_scale_and_aspect_follow_random_resized_crop(size, scale):
    """20k draws each of ours (seeded as PairMaker seeds them) and of torchvision's with other seeds: the area
    fraction and log aspect ratio have the same distribution (KS below the 0.1% critical value 1.95 sqrt(2/n),
    means within 4 standard errors); the crop is inside the image and, where draft applies, the same region."""
    n, draw = 20000, views.CropDraw(scale)
    torch.manual_seed(1)
    ours = np.array([draw(*size) for _ in range(n)], dtype=np.float64)
    torch.manual_seed(2)
    blank = Image.new('L', size)
    ref = np.array([T.RandomResizedCrop.get_params(blank, list(scale), [3 / 4, 4 / 3]) for _ in range(n)],
                   dtype=np.float64)
    assert (ours[:, 0] + ours[:, 2] <= size[1]).all() and (ours[:, 1] + ours[:, 3] <= size[0]).all()
    for stat in (lambda c: c[:, 2] * c[:, 3] / (size[0] * size[1]), lambda c: np.log(c[:, 3] / c[:, 2])):
        a, b = stat(ours), stat(ref)
        assert _ks_statistic(a, b) < 1.95 * np.sqrt(2 / n)
        assert abs(a.mean() - b.mean()) < 4 * np.sqrt(a.var() / n + b.var() / n)
    area = ours[:, 2] * ours[:, 3] / (size[0] * size[1])
    assert scale[0] - 0.01 < area.min() and area.max() <= 1.0


def test_draft_scale_keeps_every_crop_at_least_its_output_size():
    assert views.draft_scale([((0, 0, 375, 500), 224)]) == 1
    assert views.draft_scale([((0, 0, 900, 1200), 224)]) == 4
    assert views.draft_scale([((0, 0, 900, 1200), 224), ((5, 5, 500, 460), 224)]) == 2
    assert views.draft_scale([((0, 0, 100, 80), 224), ((0, 0, 2000, 2000), 224)]) == 1  # an upsampled crop
    assert views.draft_scale([((0, 0, 1800, 1800), 224)]) == 8 and views.draft_scale([((0, 0, 3600, 3600), 224)]) == 8


def test_views_of_500x375_never_draft_at_224():
    clip = views.ClipView(224, views.to_uint8)
    torch.manual_seed(0)
    assert all(views.draft_scale(clip.crops(clip.draw(500, 375))) == 1 for _ in range(2000))


def test_large_jpeg_decodes_reduced_and_gives_the_full_decode_views_closely():
    big = _photo((1600, 1200), 5)
    clip, ssl = views.ClipView(224, views.to_uint8), views.SimCLRView(224, views.to_uint8)
    full, _ = samples.decode(samples.open_image(io.BytesIO(_jpeg(big)), 'big.jpg'))
    torch.manual_seed(0)
    random.seed(0)
    reductions = []
    for k in range(12):
        params = [clip.draw(1600, 1200), ssl.draw(1600, 1200)]
        reduce = views.draft_scale(clip.crops(params[0]) + ssl.crops(params[1]))
        img, reduced = samples.decode(samples.open_image(io.BytesIO(_jpeg(big)), 'big.jpg'), reduce)
        assert reduced == reduce and img.size == (-(-1600 // reduce), -(-1200 // reduce))
        reductions.append(reduce)
        for view, p in zip((clip, ssl), params):
            got, want = view.render(img, p, reduced).float(), view.render(full, p).float()
            assert (got - want).abs().mean() < 2.5  # the same region and colours, resampled in two steps
    assert max(reductions) >= 2 and set(reductions) <= {1, 2, 4}


def test_make_decodes_lazily_once_with_draft_and_is_deterministic(tokenizer):
    maker = samples.PairMaker('slip', augment.build_transforms(64, 'uint8')[:2], tokenizer, seed=3)
    data = _jpeg(_photo((1600, 1200), 6))

    def sample(epoch):
        maker.set_epoch(epoch)
        return maker.make(samples.open_image(io.BytesIO(data), 'big.jpg'), ['a big photo'], maker.rng(7), 0)

    first, again = sample(1).tensors(), sample(1).tensors()
    assert all(torch.equal(first[k], again[k]) for k in first) and first['image'].shape == (64, 64, 3)
    assert not torch.equal(sample(2).aug1, first['aug1'])


def test_truncated_jpeg_fails_in_make_as_a_bad_image(tokenizer):
    maker = samples.PairMaker('clip', augment.build_transforms(64, 'uint8')[:2], tokenizer, seed=0)
    data = _jpeg(_photo())
    img = samples.open_image(io.BytesIO(data[:len(data) // 2]), 'half.jpg')  # the header reads fine
    with pytest.raises(samples.BadImage, match='half.jpg'):
        maker.make(img, ['c'], maker.rng(0), 0)
    with pytest.raises(samples.BadImage, match='junk.jpg'):
        samples.open_image(io.BytesIO(b'\xff\xd8 not a jpeg'), 'junk.jpg')


def test_yfcc_member_that_fails_to_decode_is_replaced_and_counted(tmp_path, tokenizer, monkeypatch):
    import argparse
    import pickle
    import zipfile

    import datasets
    good = _jpeg(_photo((80, 60)))
    (tmp_path / 'images' / '00').mkdir(parents=True)
    with zipfile.ZipFile(tmp_path / 'images' / '00' / '000.zip', 'w') as zf:
        zf.writestr('000.jpg', good)
        zf.writestr('001.jpg', good[:len(good) // 2])  # opens (its header is whole), fails to decode
        zf.writestr('002.jpg', b'not a jpeg')
    with open(tmp_path / 'm.pkl', 'wb') as f:
        pickle.dump([(i, f'title {i}', f'description {i}') for i in range(3)], f)
    warned = []
    monkeypatch.setattr(datasets, 'warn_bad', warned.append)
    args = argparse.Namespace(dataset='yfcc15m', root=str(tmp_path), metadata=str(tmp_path / 'm.pkl'),
                              model='SLIP_TINY', seed=0, image_format='uint8')
    ds = datasets.get_train_dataset(args, tokenizer)
    n_bad = [int(ds[i].n_bad) for i in range(3)]
    assert n_bad[0] == 0 and n_bad[1] >= 1 and n_bad[2] >= 1 and len(warned) == sum(n_bad)
    assert any('000.zip:001.jpg' in w for w in warned) and any('000.zip:002.jpg' in w for w in warned)
    assert n_bad == [int(ds[i].n_bad) for i in range(3)]  # replaced the same way every time
