"""The zero-shot evaluation library: classifiers, zero-shot and retrieval metrics, the model checks, evaluation data.

eval_zeroshot.py is the command line over it (and re-exports its names); main.py's per-epoch zero-shot check,
main_linear.py's probe data and export_open_clip.py's loader and model check use it directly.

Protocol (SLIP's eval_zeroshot.py, github.com/facebookresearch/SLIP): Resize + CenterCrop to the model's input size,
ImageNet normalisation, cosine logits between the normalised image embedding and a per-class text classifier (each
prompt of every template x synonym normalised, averaged, normalised again). Metric per dataset: top-1, mean per-class
accuracy (aircraft, pets, caltech101, flowers), (top-1 + top-5) / 2 (kinetics700_frames) or ROC AUC of logit[1] -
logit[0] (hateful_memes).
Retrieval (types ``retrieval_karpathy`` / ``retrieval_coco``): Recall@1/5/10 as CLIP_benchmark defines it.

A catalog entry (``dataset_catalog.json``) may be an ``alias_of`` another (``imagenet80``: ImageNet with CLIP's 80
templates) and may name its ``labels`` / ``templates`` keys and its ``metric``. Encoding prints progress lines
(progress.py) headed by the dataset's name: images (rank 0's shard when distributed) and, for retrieval, captions.
"""
import contextlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import datasets
import models
import progress
import utils
import zoo
from augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (re-exported: the evaluation transform's statistics)
from utils import logger

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER_DATASETS = ['food101', 'cifar10', 'cifar100', 'cub200', 'sun397', 'cars', 'aircraft', 'dtd', 'pets',
                  'caltech101', 'flowers', 'mnist', 'fer2013', 'stl10', 'eurosat', 'resisc45', 'gtsrb',
                  'kitti_distance', 'country211', 'patch_camelyon', 'ucf101_frames', 'kinetics700_frames',
                  'clevr_counts', 'hateful_memes', 'rendered_sst2', 'imagenet']
METRICS = {'aircraft': 'mean_per_class', 'pets': 'mean_per_class', 'caltech101': 'mean_per_class',
           'flowers': 'mean_per_class', 'kinetics700_frames': 'top1_top5', 'hateful_memes': 'roc_auc'}
RECALL_AT = (1, 5, 10)


# ----------------------------------------------------------------------------------------------------------------
# Assets: catalog, class names, templates
# ----------------------------------------------------------------------------------------------------------------
def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what} file {path!r} not found')
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{what} file {path!r} is not valid JSON: {e}') from e


def load_assets(catalog_path: Optional[str] = None, labels_path: Optional[str] = None,
                templates_path: Optional[str] = None) -> Tuple[Dict, Dict, Dict]:
    """Read the dataset catalog, class names and prompt templates (None: the JSON file beside this module).

    Raises:
        FileNotFoundError / ValueError: naming the file that is missing, not JSON, or not a JSON object.
    """
    out = []
    files = ((catalog_path, 'dataset_catalog.json', 'catalog'), (labels_path, 'labels.json', 'labels'),
             (templates_path, 'templates.json', 'templates'))
    for path, default, what in files:
        path = path or os.path.join(HERE, default)
        data = _read_json(path, what)
        if not isinstance(data, dict):
            raise ValueError(f'{what} file {path!r} must hold a JSON object (name -> ...), got {type(data).__name__}')
        out.append(data)
    return tuple(out)


def resolve_entry(catalog: Dict, name: str) -> Tuple[str, Dict]:
    """(data name, entry): an ``alias_of`` entry reads the data of another entry, with its own overrides."""
    if name not in catalog:
        raise KeyError(f'dataset {name!r} is not in the catalog (known: {", ".join(catalog)})')
    entry = dict(catalog[name])
    base = entry.pop('alias_of', name)
    if base != name:
        if base not in catalog:
            raise KeyError(f'catalog entry {name!r} is an alias of {base!r}, which is not in the catalog')
        entry = {**catalog[base], **entry}
    return base, entry


def to_rgb(image):
    return image.convert('RGB')  # a named function, not a lambda: transforms must pickle for spawned workers


def eval_transform(image_size: int):
    """SLIP's evaluation transform: Resize(size) -> CenterCrop(size) -> RGB -> ToTensor -> ImageNet Normalize."""
    import torchvision.transforms as T
    return T.Compose([T.Resize(image_size), T.CenterCrop(image_size), to_rgb, T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def model_image_size(model: torch.nn.Module) -> int:
    """Input resolution of the image tower (timm ViT patch_embed.img_size, open_clip ResNet image_size)."""
    visual = model.visual
    size = getattr(getattr(visual, 'patch_embed', None), 'img_size', None) or getattr(visual, 'image_size', 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# ----------------------------------------------------------------------------------------------------------------
# Encoding, sharding and gathering
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Evaluate under no_grad in eval mode, then restore the previous train/eval mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def encode_texts(net, tokenizer, texts: Sequence[str], device, precision: str, batch_size: int = 1024,
                 what: Optional[str] = None):
    """L2-normalised text embeddings [N, E], computed in batches (with progress lines headed ``what`` if given)."""
    feats = []
    counter = progress.Progress(what, len(texts), 'texts') if what else None
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i:i + batch_size])).to(device)
        with utils.autocast(precision, device):
            feats.append(F.normalize(net.encode_text(tokens).float(), dim=-1))
        if counter is not None:
            counter.update(len(tokens))
    if counter is not None:
        counter.finish()
    return torch.cat(feats) if feats else torch.empty(0, net.text_projection.shape[1], device=device)


def build_classifier(model, tokenizer, classnames: Sequence, templates: Sequence[str], device,
                     precision: str = 'fp32') -> torch.Tensor:
    """Zero-shot classifier [C, E]: per class, every template x synonym prompt, normalised, averaged, normalised.

    A class name may be a list of synonyms (fer2013); all prompts of all classes are encoded in batches.
    """
    net, device = getattr(model, 'module', model), torch.device(device)
    prompts, owner = [], []
    for c, names in enumerate(classnames):
        for template in templates:
            for n in ([names] if isinstance(names, str) else names):
                prompts.append(template.format(n))
                owner.append(c)
    with eval_mode(model):
        feats = encode_texts(net, tokenizer, prompts, device, precision)  # [P, E]
    owner = torch.tensor(owner, device=feats.device)
    sums = torch.zeros(len(classnames), feats.shape[1], device=feats.device).index_add_(0, owner, feats)
    counts = torch.bincount(owner, minlength=len(classnames)).clamp(min=1)
    return F.normalize(sums / counts[:, None], dim=-1)


def shard(dataset):
    """This rank's disjoint rows rank::world_size (no padding, so gathered metrics cover the exact set)."""
    world = utils.get_world_size()
    return dataset if world == 1 else torch.utils.data.Subset(dataset, range(utils.get_rank(), len(dataset), world))


def gather_shards(local: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble the rows r::W held by each rank r into the full [total, ...] tensor, in dataset order."""
    world = utils.get_world_size()
    if world == 1:
        return local
    sizes = [len(range(r, total, world)) for r in range(world)]
    padded = local.new_zeros((max(sizes),) + tuple(local.shape[1:]))  # all_gather needs equal shapes
    padded[:len(local)] = local
    bufs = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded)
    out = local.new_empty((total,) + tuple(local.shape[1:]))
    for r, (buf, n) in enumerate(zip(bufs, sizes, strict=True)):
        out[r::world] = buf[:n]
    return out


def encode_images(net, dataset, device, precision: str, batch_size: int, workers: int, with_targets: bool = True,
                  what: str = 'encoding'):
    """Normalised image embeddings of the whole dataset [N, E] (and targets [N]), sharded over ranks and gathered.

    Progress lines headed ``what`` count rank 0's shard (read, decode, forward): images, images/s and ETA.
    """
    feats, targets = [], []
    loader = torch.utils.data.DataLoader(shard(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == 'cuda')
    world = utils.get_world_size()
    what = f'{what} (shard 1 of {world})' if world > 1 else what
    with progress.Progress(what, len(loader.dataset), 'images') as counter:
        for batch in loader:
            images = (batch[0] if with_targets else batch).to(device, non_blocking=True)
            with utils.autocast(precision, device):
                feats.append(F.normalize(net.encode_image(images).float(), dim=-1))
            if with_targets:
                targets.append(torch.as_tensor(batch[1]).to(device))
            counter.update(len(images))
    dim = net.image_projection.shape[1]
    feats = gather_shards(torch.cat(feats) if feats else torch.empty(0, dim, device=device), len(dataset))
    if not with_targets:
        return feats
    targets = torch.cat(targets) if targets else torch.empty(0, dtype=torch.long, device=device)
    return feats, gather_shards(targets, len(dataset))


# ----------------------------------------------------------------------------------------------------------------
# Metrics (SLIP's eval_zeroshot.py; retrieval as CLIP_benchmark), in percent
# ----------------------------------------------------------------------------------------------------------------
def mean_per_class_accuracy(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """Average over the classes present in targets of that class's top-1 accuracy."""
    n = int(max(preds.max(), targets.max())) + 1
    correct = torch.bincount(targets[preds == targets], minlength=n).double()
    count = torch.bincount(targets, minlength=n).double()
    present = count > 0
    return float((correct[present] / count[present]).mean() * 100)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (positive class = 1), ties counted half as sklearn's trapezoids do; NaN if one class.

    Uses the Mann-Whitney form: (sum of the positives' average ranks - P(P+1)/2) / (P N).
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(labels) == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        logger.warning('ROC AUC is undefined with a single class in the targets')
        return float('nan')
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each group of tied scores
    ranks = average_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg) * 100)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, metric: str) -> Dict[str, float]:
    """{'acc1', 'acc5', 'metric'} where metric is top1 / mean_per_class / top1_top5 / roc_auc."""
    logits, targets = logits.float().cpu(), targets.long().cpu()
    acc1, acc5 = utils.accuracy(logits, targets, (1, 5))
    if metric == 'top1':
        value = acc1
    elif metric == 'mean_per_class':
        value = mean_per_class_accuracy(logits.argmax(dim=1), targets)
    elif metric == 'top1_top5':
        value = (acc1 + acc5) / 2
    elif metric == 'roc_auc':
        value = roc_auc((logits[:, 1] - logits[:, 0]).numpy(), targets.numpy())
    else:
        raise ValueError(f'unknown metric {metric!r}; expected top1, mean_per_class, top1_top5 or roc_auc')
    return {'acc1': acc1, 'acc5': acc5, 'metric': value}


def retrieval_recall(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image: Sequence[int],
                     ks: Sequence[int] = RECALL_AT, chunk: int = 1024) -> Dict[str, float]:
    """Recall@K in percent, as CLIP_benchmark defines it.

    ``image_retrieval_recall@K`` (text -> image): a caption is correct if its image is among its top K images.
    ``text_retrieval_recall@K`` (image -> text): an image is correct if any of its captions is among its top K.
    """
    owner = torch.as_tensor(text_to_image, device=image_feats.device)
    n_img, n_txt, kmax = len(image_feats), len(text_feats), max(ks)
    t2i, i2t = dict.fromkeys(ks, 0), dict.fromkeys(ks, 0)
    for s in range(0, n_txt, chunk):  # chunks keep the [rows, N] similarity blocks small (COCO: 25k x 5k)
        top = (text_feats[s:s + chunk] @ image_feats.T).topk(min(kmax, n_img), dim=1).indices  # [c, K]
        hit = top == owner[s:s + chunk, None]
        for k in ks:
            t2i[k] += int(hit[:, :k].any(dim=1).sum())
    for s in range(0, n_img, chunk):
        top = (image_feats[s:s + chunk] @ text_feats.T).topk(min(kmax, n_txt), dim=1).indices  # [c, K]
        hit = owner[top] == torch.arange(s, s + len(top), device=owner.device)[:, None]
        for k in ks:
            i2t[k] += int(hit[:, :k].any(dim=1).sum())
    out = {f'image_retrieval_recall@{k}': 100.0 * t2i[k] / max(n_txt, 1) for k in ks}
    out.update({f'text_retrieval_recall@{k}': 100.0 * i2t[k] / max(n_img, 1) for k in ks})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Retrieval data: Karpathy split JSON (COCO 5k / Flickr30k 1k test) or a COCO captions JSON (val2017)
# ----------------------------------------------------------------------------------------------------------------
class ImageList(torch.utils.data.Dataset):
    def __init__(self, paths: List[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(datasets.pil_loader(self.paths[i]))


def load_retrieval_split(name: str, entry: Dict) -> Tuple[List[str], List[List[str]]]:
    """Image paths and their captions (at most ``captions_per_image``, default 5) of a retrieval catalog entry."""
    root = entry.get('path', '')
    ann, image_dir = os.path.join(root, entry['captions']), os.path.join(root, entry.get('images', ''))
    if not os.path.isfile(ann) or not os.path.isdir(image_dir):
        raise datasets.DatasetMissing(f'{name}: captions file {ann!r} or image folder {image_dir!r} not found')
    data = _read_json(ann, f'{name} captions')
    try:
        if entry['type'] == 'retrieval_karpathy':
            rows = [im for im in data['images'] if im['split'] == entry.get('split', 'test')]
            paths = [os.path.join(image_dir, im.get('filepath', ''), im['filename']) for im in rows]
            captions = [[s['raw'].strip() for s in im['sentences']] for im in rows]
        else:  # retrieval_coco
            by_image: Dict[Any, List[str]] = {}
            for a in data['annotations']:
                by_image.setdefault(a['image_id'], []).append(a['caption'].strip())
            rows = sorted(data['images'], key=lambda im: im['id'])
            paths = [os.path.join(image_dir, im['file_name']) for im in rows]
            captions = [by_image.get(im['id'], []) for im in rows]
    except (KeyError, TypeError) as e:
        raise ValueError(f'{ann!r} is not a {entry["type"]} captions file (missing field {e})') from e
    captions = [c[:entry.get('captions_per_image', 5)] for c in captions]
    if not paths or any(not c for c in captions):
        raise ValueError(f'{ann!r}: no images in the split, or an image without captions')
    return paths, captions


def evaluate_retrieval(net, name: str, entry: Dict, tokenizer, device, batch_size: int, workers: int,
                       precision: str, image_size: int) -> Dict[str, float]:
    paths, captions = load_retrieval_split(name, entry)
    image_feats = encode_images(net, ImageList(paths, eval_transform(image_size)), device, precision, batch_size,
                                workers, with_targets=False, what=name)
    texts = [c for caps in captions for c in caps]
    owner = [i for i, caps in enumerate(captions) for _ in caps]
    local = texts[utils.get_rank()::utils.get_world_size()]  # this rank's captions, like shard()
    text_feats = gather_shards(encode_texts(net, tokenizer, local, device, precision, batch_size,
                                            what=f'{name} captions'), len(texts))
    out = retrieval_recall(image_feats, text_feats, owner)
    out['metric'] = float(np.mean(list(out.values())))  # mean recall over both directions and K
    return out


# ----------------------------------------------------------------------------------------------------------------
# One dataset
# ----------------------------------------------------------------------------------------------------------------
def zeroshot_dataset(model, name: str, assets, tokenizer, device, batch_size: int = 256, workers: int = 4,
                     precision: str = 'fp32', image_size: Optional[int] = None) -> Dict[str, float]:
    """Evaluate one catalog dataset; {'acc1', 'acc5', 'metric'} (classification) or recalls + 'metric'.

    Every rank of a process group evaluates a disjoint shard; logits are gathered so the metric is exact.

    Raises:
        datasets.DatasetMissing: the dataset's files are not on disk.
    """
    catalog, labels, templates = assets
    base, entry = resolve_entry(catalog, name)
    net, device = getattr(model, 'module', model), torch.device(device)
    image_size = image_size or model_image_size(net)
    with eval_mode(model):
        if str(entry.get('type', '')).startswith('retrieval'):
            return evaluate_retrieval(net, name, entry, tokenizer, device, batch_size, workers, precision, image_size)
        dataset = datasets.get_downstream_dataset(catalog, base, False, eval_transform(image_size))
        label_key, template_key = entry.get('labels', base), entry.get('templates', base)
        for key, table, what in ((label_key, labels, 'labels'), (template_key, templates, 'templates')):
            if key not in table:
                raise KeyError(f'{name}: no entry {key!r} in {what}.json')
        classnames = labels[label_key]
        if hasattr(dataset, 'classes') and len(dataset.classes) != len(classnames):
            raise ValueError(f'{name}: the dataset has {len(dataset.classes)} classes but labels.json '
                             f'[{label_key!r}] lists {len(classnames)}')
        classifier = build_classifier(net, tokenizer, classnames, templates[template_key], device, precision)
        feats, targets = encode_images(net, dataset, device, precision, batch_size, workers, what=name)
        logits = feats @ classifier.T  # [N, C] cosine similarities, no logit scale (argmax-invariant)
    return classification_metrics(logits, targets, entry.get('metric', METRICS.get(base, 'top1')))


# ----------------------------------------------------------------------------------------------------------------
# The model checks and loading a checkpoint
# ----------------------------------------------------------------------------------------------------------------
NO_TEXT_TOWER = ('a SimCLR model without a text encoder: zero-shot evaluation needs a CLIP or SLIP checkpoint '
                 '(evaluate SimCLR with main_linear.py)')


def text_model_spec(ckpt: Dict, path: str, name: Optional[str] = None, *, no_text: str = NO_TEXT_TOWER,
                    no_name: str = ', so the architecture is unknown') -> models.ModelSpec:
    """The spec of the model a checkpoint holds, checked to be one with a text tower (CLIP or SLIP).

    ``name`` (a ``--model`` flag) overrides the checkpoint's ``args.model``. ``no_text`` and ``no_name`` end the two
    messages below, so each caller says what it needs and what the user can do.

    Raises:
        utils.CheckpointError: neither ``name`` nor the checkpoint's ``args.model`` names the architecture.
        KeyError: the name is not a registered model.
        ValueError: the model is a SimCLR model, which has no text tower.
    """
    name = name or ckpt['args'].get('model')
    if not name:
        raise utils.CheckpointError(f'checkpoint {path!r} has no args.model{no_name}')
    spec = models.get_spec(name)
    if not spec.has_text:
        raise ValueError(f'checkpoint {path!r} holds {spec.name}, {no_text}')
    return spec


def load_model(path: str, device) -> Tuple[torch.nn.Module, Dict]:
    """Rebuild the checkpoint's model from its stored args (any released or new checkpoint) and load it strictly."""
    ckpt = zoo.load_checkpoint(path)
    spec = text_model_spec(ckpt, path)
    model = models.create_model_from_args(spec.name, ckpt['args'])
    utils.load_state_dict_checked(model, ckpt['state_dict'], path, strict=True)
    logger.info("=> loaded '%s' (%s, epoch %s)", path, spec.name, ckpt.get('epoch'))
    return model.to(device).eval(), ckpt
