"""The downstream evaluation sets (zero-shot and linear probe), described by ``dataset_catalog.json`` entries
``{"path", "type", "train", "test"}`` with type ``imagefolder``, ``filelist`` (``<split>_images.npy`` /
``<split>_labels.npy``), ``special`` (torchvision's CIFAR-10/100, STL-10 and MNIST, read from local files only) or
``demo`` (the generated demo set). Nothing is downloaded.

References: SLIP ``datasets.py`` and ``dataset_catalog.json`` (github.com/facebookresearch/SLIP).
"""
import os
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from demo_data import DemoZeroShotDataset
from samples import pil_loader


class DatasetMissing(FileNotFoundError):
    """A downstream dataset whose files are not on disk (reported, and the other datasets still run)."""


class FileListDataset(torch.utils.data.Dataset):
    """Images and labels listed in two .npy arrays (paths, labels)."""

    def __init__(self, images: str, labels: str, transform: Optional[Callable] = None,
                 target_transform: Optional[Callable] = None):
        for path in (images, labels):
            if not os.path.isfile(path):
                raise DatasetMissing(f'file list {path!r} not found')
        self.images = np.load(images, allow_pickle=False)
        self.labels = np.load(labels, allow_pickle=False)
        if len(self.images) != len(self.labels):
            raise ValueError(f'{images!r} lists {len(self.images)} images but {labels!r} has {len(self.labels)} labels')
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = pil_loader(str(self.images[index]))
        target = self.labels[index].item()
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


CLEVR_COUNTS = ['count_10', 'count_3', 'count_4', 'count_5', 'count_6', 'count_7', 'count_8', 'count_9']
SPECIAL = {'cifar10': 'CIFAR10', 'cifar100': 'CIFAR100', 'stl10': 'STL10', 'mnist': 'MNIST'}


def get_downstream_dataset(catalog: Dict[str, Any], name: str, is_train: bool, transform: Callable):
    """Build a catalog dataset's train or test split from local files.

    Raises:
        KeyError: the name is not in the catalog.
        DatasetMissing: its files are not on disk (nothing is downloaded).
    """
    if name not in catalog:
        raise KeyError(f'dataset {name!r} is not in the catalog (known: {", ".join(catalog)})')
    entry = catalog[name]
    root, kind = entry.get('path', ''), entry.get('type')
    if kind == 'demo':
        size = int(entry.get('size', 1024))  # a catalog may ask for a smaller demo set (tests do)
        return DemoZeroShotDataset('train' if is_train else 'test', transform=transform, size=size)
    if kind == 'imagefolder':
        import torchvision
        folder = os.path.join(root, entry['train'] if is_train else entry['test'])
        if not os.path.isdir(folder):
            raise DatasetMissing(f'{name}: image folder {folder!r} not found (set its path in the catalog)')
        return torchvision.datasets.ImageFolder(folder, transform=transform)
    if kind == 'filelist':
        split = entry['train'] if is_train else entry['test']
        target_transform = None
        if name == 'clevr_counts':
            target_transform = lambda label: CLEVR_COUNTS.index(str(label))  # noqa: E731
        return FileListDataset(os.path.join(root, f'{split}_images.npy'), os.path.join(root, f'{split}_labels.npy'),
                               transform, target_transform)
    if kind == 'special':
        if name not in SPECIAL:
            raise ValueError(f'catalog entry {name!r} has type "special", which only {", ".join(SPECIAL)} can have '
                             f'(torchvision datasets); use type imagefolder or filelist for other data')
        import torchvision
        cls = getattr(torchvision.datasets, SPECIAL[name])
        try:
            if name == 'stl10':
                return cls(root, split='train' if is_train else 'test', transform=transform, download=False)
            return cls(root, train=is_train, transform=transform, download=False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise DatasetMissing(f'{name}: no local copy under {root!r} ({e})') from e
    raise ValueError(f'dataset {name!r} has unknown type {kind!r} in the catalog')
