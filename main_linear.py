"""Linear probe of a frozen CLIP / SimCLR / SLIP image backbone (MoCo v3 protocol, SLIP's main_linear.py), bugs fixed.

Commands:
    torchrun --nproc_per_node=8 main_linear.py --pretrained slip_base_25ep.pt --dataset imagenet --output-dir out/lin
    python run_with_submitit.py --stage linear --nodes 1 --ngpus 8 --pretrained slip_base_25ep.pt --dataset imagenet
    python main_linear.py --pretrained ckpt.pt --dataset imagenet --cached-features --lr 0.1 --output-dir out/lin

The frozen backbone is the checkpoint's own image tower (``args.model`` of the checkpoint, so a ViT-S is MoCo v3's
12-head ViT-S); only checkpoints without args fall back to ``--arch`` (``vit_small_*`` also gets 12 heads). SGD with
momentum on a Linear head (the dataset's number of classes), lr = --lr x global batch / 256, per-epoch cosine decay.
Train augmentation RandomResizedCrop + flip; evaluation Resize(256/224 x size) + CenterCrop(size).

``--cached-features``: the backbone runs once over both splits and the head trains on the cached tensors (minutes
instead of hours). The training split then uses the deterministic evaluation transform, i.e. no augmentation, as
cached probes (CLIP's, CLIP_benchmark's) do; numbers are close to, not identical with, the augmented probe.

Outputs in --output-dir: linear_checkpoint.pt (every epoch; auto-resumed), linear_best.pt (best top-1), and the JSON
lines log linear_<dataset>_lr=<lr>_log.txt. Checkpoints hold the head only (the backbone is --pretrained's).
"""
import argparse
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn

import augment
import checkpoints
import datasets
import models
import utils
import zeroshot
import zoo
from utils import logger

MOCOV3_VIT_SMALL = {'vit_small_patch16_224': 'vit_small_patch16_224',
                    'vit_small_mocov3_patch16_224': 'vit_small_patch16_224'}  # both mean the 12-head ViT-S


def get_args_parser():
    parser = argparse.ArgumentParser('SLIP linear probe', add_help=False)
    parser.add_argument('--dataset', default='imagenet', help='key of the dataset catalog')
    parser.add_argument('--catalog', default=None, help='dataset_catalog.json (default: the one beside this script)')
    parser.add_argument('--output-dir', default='./', type=str)
    parser.add_argument('-a', '--arch', default='vit_base_patch16_224',
                        help='timm backbone, used only for checkpoints that do not store args.model')
    parser.add_argument('-j', '--workers', default=utils.default_workers(), type=int,
                        help='data loader workers per node, shared by its processes (default: the cores available, '
                             'at most 10)')
    parser.add_argument('--epochs', default=90, type=int)
    parser.add_argument('--start-epoch', default=0, type=int, help='overwritten when resuming')
    parser.add_argument('-b', '--batch-size', default=128, type=int, help='per process')
    parser.add_argument('--lr', '--learning-rate', default=0.1, type=float, dest='lr',
                        help='base lr; the actual lr is lr x batch-size x world-size / 256')
    parser.add_argument('--momentum', default=0.9, type=float)
    parser.add_argument('--wd', '--weight-decay', default=0.0, type=float, dest='weight_decay')
    parser.add_argument('-p', '--print-freq', default=10, type=int)
    parser.add_argument('--eval-freq', default=10, type=int, help='epochs between evaluations (the last always is)')
    parser.add_argument('--resume', default='', type=str,
                        help='linear checkpoint (default: <output-dir>/linear_checkpoint.pt when present)')
    parser.add_argument('--resume-override', action='store_true',
                        help='resume a linear checkpoint trained with other settings (pretrained, dataset, batch, '
                             'schedule, seed, precision); the differences are logged instead of stopping the run')
    parser.add_argument('-e', '--evaluate', action='store_true', help='only evaluate the resumed head')
    parser.add_argument('--pretrained', default='', type=str,
                        help='CLIP / SimCLR / SLIP pre-training checkpoint: a path, a released name '
                             '(slip_base_100ep, ... see zoo.py) or an http(s) URL')
    parser.add_argument('--cached-features', action='store_true',
                        help='extract features once (train split without augmentation) and train on them')
    parser.add_argument('--precision', default='fp32', choices=utils.PRECISIONS, help='backbone forward precision')
    parser.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: cuda when available)')
    parser.add_argument('--seed', default=None, type=int)
    parser.add_argument('--world-size', default=1, type=int, help='number of processes (Slurm launch only)')
    parser.add_argument('--rank', default=0, type=int)
    parser.add_argument('--local_rank', '--local-rank', default=0, type=int, help='unused: torchrun sets LOCAL_RANK')
    parser.add_argument('--dist-url', default='env://', type=str)
    parser.add_argument('--dist-backend', default='nccl', type=str, help='unused: nccl on GPU, gloo on CPU')
    parser.add_argument('--gpu', default=None, type=int, help='same as --device cuda:N')
    return parser


def scaled_lr(lr: float, batch_size: int, world_size: int) -> float:
    """MoCo v3 linear scaling with the GLOBAL batch (the original divided the per-process batch by world size)."""
    return lr * batch_size * world_size / 256


def build_backbone(ckpt, path: str, arch: str):
    """Frozen image tower with the checkpoint's ``visual.*`` weights; returns (backbone, image size, weights)."""
    weights = {k[len('visual.'):]: v for k, v in ckpt['state_dict'].items() if k.startswith('visual.')}
    if not weights:
        raise utils.CheckpointError(f'{path!r} has no visual.* weights: expected a CLIP, SimCLR or SLIP checkpoint')
    name = ckpt['args'].get('model')
    if name:
        spec = models.get_spec(name)
        backbone = models.create_model(spec.name, ckpt['args'].get('ssl_mlp_dim'),
                                       ckpt['args'].get('ssl_emb_dim')).visual
        image_size = spec.image_size
        logger.info('backbone: the image tower of %s (from the checkpoint; --arch is not used)', spec.name)
    else:
        import timm
        overrides = {'num_heads': 12} if arch in MOCOV3_VIT_SMALL else {}
        backbone = timm.create_model(MOCOV3_VIT_SMALL.get(arch, arch), pretrained=False, num_classes=0, **overrides)
        image_size = 224
        logger.info('backbone: timm %s %s (the checkpoint stores no model name)', arch, overrides or '')
    utils.load_state_dict_checked(backbone, weights, path, strict=True)
    for p in backbone.parameters():
        p.requires_grad = False
    return backbone.eval(), image_size, weights


def sanity_check(backbone: nn.Module, weights, path: str) -> None:
    """The frozen backbone must still equal the pre-trained weights (nothing trained or overwrote them)."""
    for k, v in backbone.state_dict().items():
        if not torch.equal(v.detach().cpu(), weights[k].to(v.dtype)):
            raise RuntimeError(f'backbone weight {k!r} differs from the pre-trained one in {path!r}')
    logger.info('=> sanity check passed: backbone equals the pre-trained weights')


def transforms(image_size: int):
    import torchvision.transforms as T
    norm = [zeroshot.to_rgb, T.ToTensor(), T.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)]
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] + norm)
    val = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)] + norm)
    return train, val


def num_classes_of(dataset, name: str) -> int:
    if hasattr(dataset, 'classes'):
        return len(dataset.classes)
    labels = zeroshot.load_assets()[1]
    if name in labels:
        return len(labels[name])
    return int(max(int(dataset[i][1]) for i in range(len(dataset)))) + 1


def feature_dim(backbone: nn.Module) -> int:
    return getattr(backbone, 'num_features', None) or backbone.output_dim  # timm ViT / open_clip ModifiedResNet


def backbone_features(backbone, images, device, precision: str) -> torch.Tensor:
    with torch.no_grad(), utils.autocast(precision, device):
        return models.visual_forward(backbone, images).float()  # [B, D]; class-token-only last block


def extract_features(backbone, dataset, args, device):
    """Features and targets of a whole split on every rank: each rank encodes a disjoint shard, then all-gather."""
    loader = torch.utils.data.DataLoader(zeroshot.shard(dataset), batch_size=args.batch_size,
                                         num_workers=args.workers, pin_memory=device.type == 'cuda')
    feats, targets = [torch.empty(0, feature_dim(backbone), device=device)], [torch.empty(0, dtype=torch.long)]
    for images, target in loader:
        feats.append(backbone_features(backbone, images.to(device, non_blocking=True), device, args.precision))
        targets.append(torch.as_tensor(target))
    feats = zeroshot.gather_shards(torch.cat(feats), len(dataset)).cpu()
    targets = zeroshot.gather_shards(torch.cat(targets).to(device), len(dataset)).cpu()
    return torch.utils.data.TensorDataset(feats, targets)


def build_loaders(args, backbone, image_size, device):
    catalog = zeroshot.load_assets(args.catalog)[0]
    train_tf, val_tf = transforms(image_size)
    # Cached features are computed once, so the train split gets the deterministic transform (no augmentation).
    train_set = datasets.get_downstream_dataset(catalog, args.dataset, True,
                                                val_tf if args.cached_features else train_tf)
    val_set = datasets.get_downstream_dataset(catalog, args.dataset, False, val_tf)
    classes = num_classes_of(train_set, args.dataset)
    if args.cached_features:
        start = time.time()
        train_set = extract_features(backbone, train_set, args, device)
        val_set = extract_features(backbone, val_set, args, device)
        logger.info('cached %d train / %d val features in %.1f s', len(train_set), len(val_set), time.time() - start)
    workers = 0 if args.cached_features else args.workers
    sampler = torch.utils.data.DistributedSampler(train_set, seed=args.seed or 0) if args.distributed else None
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=sampler is None,
                                               sampler=sampler, num_workers=workers, pin_memory=device.type == 'cuda')
    val_loader = torch.utils.data.DataLoader(zeroshot.shard(val_set), batch_size=256, num_workers=workers,
                                             pin_memory=device.type == 'cuda')  # disjoint shards: exact metrics
    return train_loader, val_loader, classes


def run_epoch(backbone, head, loader, device, args, optimizer=None):
    """One pass over a loader: trains the head when an optimizer is given, otherwise evaluates it."""
    head.train(optimizer is not None)  # the backbone always stays in eval mode: frozen features
    meters = utils.MetricLogger(device)
    criterion = nn.CrossEntropyLoss()
    start = time.time()
    for i, (x, target) in enumerate(loader):
        x, target = x.to(device, non_blocking=True), target.to(device, non_blocking=True)
        feats = x if args.cached_features else backbone_features(backbone, x, device, args.precision)
        with torch.set_grad_enabled(optimizer is not None):
            logits = head(feats)  # [B, C]
            loss = criterion(logits, target)
        if optimizer is not None:
            if not math.isfinite(loss.item()):
                raise RuntimeError(f'loss is {loss.item()} at step {i}, stopping training')
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        acc1, acc5 = utils.accuracy(logits, target, (1, 5))
        meters.update(n=len(target), loss=loss.item(), acc1=acc1, acc5=acc5)
        if optimizer is not None and i % args.print_freq == 0:
            logger.info('[%d/%d] %s (%.2f s/it)', i, len(loader), meters, (time.time() - start) / (i + 1))
    meters.synchronize()  # exact sums over ranks
    return meters.averages()


# Arguments that change what the head learns; a resume with others stops unless --resume-override (workers, print
# and evaluation frequency, output paths may differ).
RESUME_FIELDS = ('pretrained', 'dataset', 'arch', 'epochs', 'batch_size', 'world_size', 'lr', 'momentum',
                 'weight_decay', 'seed', 'cached_features', 'precision')


def resume(args, head, optimizer):
    """Load head, optimizer, epoch and best top-1 from --resume or <output-dir>/linear_checkpoint.pt.

    A checkpoint trained with other RESUME_FIELDS is refused (naming them) unless --resume-override or --evaluate.
    """
    path = args.resume or os.path.join(args.output_dir, 'linear_checkpoint.pt')
    if not os.path.isfile(path):
        if args.resume or args.evaluate:
            raise FileNotFoundError(f'--resume {path!r}: no such linear checkpoint')
        return 0.0
    ckpt = utils.load_checkpoint(path)
    if not args.evaluate:
        utils.check_resume_args(ckpt['args'], vars(args), RESUME_FIELDS, path, args.resume_override)
    head_weights = {k[len('head.'):]: v for k, v in ckpt['state_dict'].items() if k.startswith('head.')}
    utils.load_state_dict_checked(head, head_weights, path, strict=True)
    if 'optimizer' in ckpt and not args.evaluate:
        optimizer.load_state_dict(ckpt['optimizer'])
    args.start_epoch = int(ckpt.get('epoch', 0))
    logger.info("=> resumed '%s' (epoch %d)", path, args.start_epoch)
    return float(ckpt.get('best_acc1', 0.0))


def main(args):
    if args.gpu is not None and args.device is None:
        args.device = f'cuda:{args.gpu}'
    device = utils.init_distributed_mode(args)
    if not args.pretrained:
        raise ValueError('--pretrained is required: the CLIP / SimCLR / SLIP checkpoint whose backbone is probed')
    args.cached_features = args.cached_features and not args.evaluate  # evaluation alone needs no feature cache
    if args.seed is not None:
        random.seed(args.seed + args.rank)
        np.random.seed(args.seed + args.rank)
        torch.manual_seed(args.seed + args.rank)
    local_procs = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    args.workers = (args.workers + local_procs - 1) // local_procs  # --workers is per node, as in MoCo v3
    backbone, image_size, weights = build_backbone(zoo.load_checkpoint(args.pretrained), args.pretrained, args.arch)
    backbone.to(device)
    train_loader, val_loader, classes = build_loaders(args, backbone, image_size, device)

    head = nn.Linear(feature_dim(backbone), classes).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    net = nn.parallel.DistributedDataParallel(head, device_ids=[device.index] if device.type == 'cuda' else None) \
        if args.distributed else head
    lr = scaled_lr(args.lr, args.batch_size, args.world_size)
    optimizer = torch.optim.SGD(head.parameters(), lr, momentum=args.momentum, weight_decay=args.weight_decay)
    logger.info('%d classes, global batch %d, lr %.4g (= %g x %d / 256)', classes, args.batch_size * args.world_size,
                lr, args.lr, args.batch_size * args.world_size)
    best_acc1 = resume(args, head, optimizer)
    log_path = os.path.join(args.output_dir, f'linear_{args.dataset}_lr={args.lr}_log.txt')

    if args.evaluate:
        stats = run_epoch(backbone, head, val_loader, device, args)
        sanity_check(backbone, weights, args.pretrained)
        logger.info('evaluation: %s', stats)
        return stats
    stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        if isinstance(train_loader.sampler, torch.utils.data.DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group['lr'] = lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
        start = time.time()
        stats = {f'train_{k}': v for k, v in run_epoch(backbone, net, train_loader, device, args, optimizer).items()}
        stats.update(epoch=epoch, lr=optimizer.param_groups[0]['lr'], epoch_seconds=time.time() - start)
        is_best = False
        if (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs:
            # the plain head: ranks hold different numbers of val batches, which DDP's forward must not see
            stats.update({f'test_{k}': v for k, v in run_epoch(backbone, head, val_loader, device, args).items()})
            is_best = stats['test_acc1'] > best_acc1
            best_acc1 = max(best_acc1, stats['test_acc1'])
        if epoch == args.start_epoch:
            sanity_check(backbone, weights, args.pretrained)
        head_weights = {f'head.{k}': v for k, v in head.state_dict().items()}
        state = {'epoch': epoch + 1, 'arch': args.arch, 'state_dict': head_weights, 'best_acc1': float(best_acc1),
                 'optimizer': optimizer.state_dict(), 'args': args}
        checkpoints.save_checkpoint(state, is_best, args.output_dir, 'linear_checkpoint.pt', 'linear_best.pt')
        if utils.is_main_process():
            utils.append_json_line(log_path, stats)
        logger.info('epoch %d: %s (best top-1 %.2f)', epoch, stats, best_acc1)
    sanity_check(backbone, weights, args.pretrained)
    return {**stats, 'best_acc1': best_acc1}


if __name__ == '__main__':
    parser = argparse.ArgumentParser('SLIP linear probe', parents=[get_args_parser()])
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    main(args)
