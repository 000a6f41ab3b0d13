"""The original SLIP's per-sample data computation for the YFCC15M zip layout, the yardstick of ``bench.py data``.

Written here from the description of facebookresearch/SLIP (datasets.py, tokenizer.py, main.py; commit c6faf5d) in
docs/SLIP_REFERENCE.md sections 3-4, so that the benchmark's ratio is to what the original does per sample:
  * the metadata pickle loaded as a Python list of (photo_id, title, description);
  * ``yfcc_loader``: a new ZipFile on every call (its central directory read each time), the member opened as a file
    object for PIL, decoded by ``.convert('RGB')`` after the archive is closed;
  * the caption: ``np.random.choice`` between title and description (the global NumPy stream, no per-sample seed);
  * the CLIP view: RandomResizedCrop(224, scale=(0.5, 1)) -> ToTensor -> Normalize, in the worker;
  * two SimCLR views: RandomResizedCrop(224, scale=(0.08, 1)) -> RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)],
    p=0.8) -> RandomGrayscale(0.2) -> RandomApply([GaussianBlur(0.1-2)], p=0.5) -> RandomHorizontalFlip ->
    ToTensor -> Normalize, each from the decoded image;
  * the caption tokenized by OpenAI CLIP's SimpleTokenizer: ftfy and HTML clean-up, lower case, byte-level BPE with a
    per-process cache of words, [SOT] + ids + [EOT] cut to 77 by slicing, zero padded. Its cleaning and BPE are
    open_clip's ``SimpleTokenizer.encode`` (the same vocabulary, merges and clean-up);
  * samples are tuples, batched by the DataLoader's default collate.
"""
import os
import pickle
import zipfile

import numpy as np
import torch
from PIL import Image

import augment


class OriginalTokenizer:
    """OpenAI CLIP's SimpleTokenizer call as SLIP used it (over-long captions lose their end-of-text token)."""

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer
        self.bpe, self.context_length = SimpleTokenizer(), context_length
        self.sot, self.eot = self.bpe.sot_token_id, self.bpe.eot_token_id  # 49406, 49407

    def __call__(self, texts):
        single = isinstance(texts, str)
        rows = [[self.sot] + self.bpe.encode(t) + [self.eot] for t in ([texts] if single else texts)]
        out = torch.zeros(len(rows), self.context_length, dtype=torch.long)
        for k, ids in enumerate(rows):
            ids = ids[:self.context_length]
            out[k, :len(ids)] = torch.tensor(ids)
        return out[0] if len(rows) == 1 else out


def original_transforms(size: int):
    """(train_transform, augment) of the original: the CLIP view and the SimCLR augmentation, float tensors."""
    import torchvision.transforms as T
    finish = [T.ToTensor(), T.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)]
    clip = T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0)), *finish])
    ssl = T.Compose([T.RandomResizedCrop(size, scale=(0.08, 1.0)),
                     T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                     T.RandomApply([augment.GaussianBlur((0.1, 2.0))], p=0.5), T.RandomHorizontalFlip(), *finish])
    return clip, ssl


class OriginalYFCC(torch.utils.data.Dataset):
    """The original's ImageCaptionDataset{CLIP,SSL,SLIP} for yfcc15m: (image, text), (aug1, aug2) or
    (image, text, aug1, aug2) per sample, by model family."""

    def __init__(self, root: str, metadata: str, family: str, size: int):
        with open(metadata, 'rb') as f:
            self.samples = pickle.load(f)
        self.root, self.family = root, family
        self.transform, self.augment = original_transforms(size)
        self.tokenizer = OriginalTokenizer() if family != 'simclr' else None

    def __len__(self):
        return len(self.samples)

    def load(self, photo_id: int) -> Image.Image:
        """PIL reads the member through the archive's file object, and decodes it once the archive is closed (its
        file stays open for the member), as the original's yfcc_loader does."""
        s = f'{int(photo_id):08d}'
        with zipfile.ZipFile(os.path.join(self.root, 'images', s[:2], s[2:5] + '.zip')) as z:
            img = Image.open(z.open(s[5:] + '.jpg'))
        return img.convert('RGB')

    def __getitem__(self, i):
        photo_id, title, description = self.samples[i]
        img, caption = self.load(photo_id), np.random.choice([title, description])
        if self.family == 'simclr':
            return self.augment(img), self.augment(img)
        image, text = self.transform(img), self.tokenizer(caption)
        if self.family == 'clip':
            return image, text
        return image, text, self.augment(img), self.augment(img)
