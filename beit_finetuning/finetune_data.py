"""Fine-tuning data: BEiT's train/eval transforms from timm, ImageNet / image-folder datasets, loaders and Mixup.

Train: timm's ``create_transform`` (random-resized crop, flip, RandAugment ``--aa``, random erasing ``--reprob``).
Eval: resize to ``input_size / crop_pct`` (crop_pct 224/256 below 384 px, else 1) and centre crop, as BEiT.
Nothing is downloaded: a missing folder is an error that names it.
"""
import argparse
import os
from typing import Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.data import Mixup, create_transform
from timm.data import auto_augment
from PIL import Image
from torchvision import datasets as tv_datasets
from torchvision import transforms

from datasets import DatasetMissing


def mean_std(args: argparse.Namespace) -> Tuple[tuple, tuple]:
    """ImageNet statistics with --imagenet_default_mean_and_std (the SLIP recipes), BEiT's 0.5/0.5 otherwise."""
    if args.imagenet_default_mean_and_std:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD


def posterize_zero_bits_black(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, except that keeping 0 bits gives a black image instead of an error.

    With ``rand-m9-mstd0.5-inc1`` a magnitude drawn at the clip value 10 asks PosterizeIncreasing to keep 0 bits
    (about 0.15% of images). Older Pillow returned a black image then; Pillow 13 raises ValueError, which would
    kill a run within the first few hundred ImageNet batches. Here the old result is kept.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _patch_posterize(transform) -> None:
    for t in getattr(transform, 'transforms', []):
        for op in getattr(t, 'ops', []):  # RandAugment / AutoAugment ops
            if getattr(op, 'aug_fn', None) is auto_augment.posterize:
                op.aug_fn = posterize_zero_bits_black


def build_transform(is_train: bool, args: argparse.Namespace):
    mean, std = mean_std(args)
    if is_train:
        transform = create_transform(
            input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
            auto_augment=args.aa if args.aa and args.aa != 'none' else None, interpolation=args.train_interpolation,
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, mean=mean, std=std)
        _patch_posterize(transform)
        return transform
    crop_pct = args.crop_pct or (224 / 256 if args.input_size < 384 else 1.0)
    return transforms.Compose([
        transforms.Resize(int(args.input_size / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(args.input_size),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])


def _folder(data_set: str, is_train: bool, args: argparse.Namespace) -> str:
    if data_set == 'IMNET':  # ImageNet layout: <root>/train and <root>/val
        root = args.data_path if is_train else (args.eval_data_path or args.data_path)
        return os.path.join(root, 'train' if is_train else 'val')
    folder = args.data_path if is_train else args.eval_data_path
    if not folder:
        raise ValueError('--data_set image_folder needs --eval_data_path for evaluation '
                         '(or pass --disable_eval_during_finetuning)')
    return folder


def build_dataset(is_train: bool, args: argparse.Namespace) -> Tuple[torch.utils.data.Dataset, int]:
    """The train or eval split and its number of classes.

    Raises:
        DatasetMissing: the folder (or the CIFAR-100 files) is not on disk.
        ValueError: --nb_classes disagrees with the number of class folders.
    """
    transform = build_transform(is_train, args)
    if args.data_set == 'CIFAR':  # CIFAR-100, read from local files under --data_path
        try:
            dataset = tv_datasets.CIFAR100(args.data_path, train=is_train, transform=transform, download=False)
        except RuntimeError as e:
            raise DatasetMissing(f'CIFAR-100 not found under --data_path {args.data_path!r} ({e})') from e
        num_classes = 100
    else:
        folder = _folder(args.data_set, is_train, args)
        if not os.path.isdir(folder):
            raise DatasetMissing(f'image folder {folder!r} not found (--data_set {args.data_set}, '
                                 f'--data_path {args.data_path!r}, --eval_data_path {args.eval_data_path!r})')
        dataset = tv_datasets.ImageFolder(folder, transform=transform)
        num_classes = len(dataset.classes)
    if args.nb_classes and args.nb_classes != num_classes:
        raise ValueError(f'--nb_classes {args.nb_classes} but the {"train" if is_train else "eval"} data '
                         f'({args.data_path if is_train else args.eval_data_path or args.data_path}) '
                         f'has {num_classes} classes')
    return dataset, num_classes


def build_loaders(args: argparse.Namespace, dataset_train, dataset_val, world_size: int, rank: int):
    """Distributed train loader (shuffled, full batches) and an eval loader over this rank's share of the set.

    Each rank evaluates every world_size-th image, with no padding, so the summed counts are exact.
    """
    sampler = torch.utils.data.DistributedSampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True,
                                                  seed=args.seed)
    pin = args.pin_mem and str(args.device).startswith('cuda')  # pinning only helps copies to a GPU
    train_loader = torch.utils.data.DataLoader(
        dataset_train, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
        pin_memory=pin, drop_last=True, persistent_workers=args.num_workers > 0)
    val_loader = None
    if dataset_val is not None:
        shard = torch.utils.data.Subset(dataset_val, range(rank, len(dataset_val), world_size))
        val_loader = torch.utils.data.DataLoader(
            shard, batch_size=int(1.5 * args.batch_size), shuffle=False, num_workers=args.num_workers,
            pin_memory=pin, drop_last=False)
    return train_loader, val_loader


def build_mixup(args: argparse.Namespace) -> Optional[Mixup]:
    """timm Mixup/CutMix with label smoothing folded into the soft targets, or None when both are off."""
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    if args.batch_size % 2:
        raise ValueError(f'--batch_size {args.batch_size} must be even with --mixup/--cutmix (pairs are mixed)')
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.nb_classes)
