"""End-to-end ImageNet fine-tuning of a SLIP / CLIP / SimCLR ViT with the BEiT recipe, on plain PyTorch + timm.

Accepts the flags of the seed's BEiT-based script; runs native DDP, AdamW with layer-wise lr decay and autocast
(no BEiT clone, Apex or DeepSpeed). ViT-B from a SLIP checkpoint, 8 GPUs x 128 (see README.md for S and L):

    torchrun --nproc_per_node=8 beit_finetuning/run_class_finetuning.py \
        --batch_size 128 --enable_deepspeed --epochs 100 --warmup_epochs 20 --model beit_base_patch16_224 \
        --nb_classes 1000 --imagenet_default_mean_and_std --model_key state_dict --model_prefix module.visual. \
        --disable_rel_pos_bias --abs_pos_emb --use_cls --mixup 0.8 --cutmix 1 --layer_scale_init_value 0 \
        --lr 4e-3 --drop_path 0.1 --layer_decay 0.65 --data_path /path/to/imagenet \
        --output_dir /path/to/output --finetune /path/to/slip_base_100ep.pt

Throughput check without data: add ``--benchmark_steps 5`` (synthetic images; prints the median images/s).
Outputs in --output_dir: checkpoint-last.pth (every epoch), checkpoint-<epoch>.pth (every --save_ckpt_freq epochs),
checkpoint-best.pth (best eval top-1), log.txt (one JSON line per epoch). A rerun resumes from checkpoint-last.pth.
"""
import argparse
import glob
import os
import random
import re
import sys

if __package__ in (None, ''):  # run as a file (torchrun beit_finetuning/run_class_finetuning.py): see the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

import checkpoints
import utils
import zoo
from beit_finetuning import engine, finetune_data, finetune_model


def get_args_parser():
    p = argparse.ArgumentParser('Fine-tune a SLIP ViT on image classification (BEiT recipe)', add_help=False)
    a = p.add_argument
    a('--batch_size', default=64, type=int, help='per-process batch; effective = batch_size x update_freq x world')
    a('--epochs', default=30, type=int)
    a('--update_freq', default=1, type=int, help='gradient accumulation steps per optimizer step')
    a('--save_ckpt_freq', default=5, type=int, help='also keep checkpoint-<epoch>.pth every this many epochs')
    # Model
    a('--model', default='beit_base_patch16_224', choices=sorted(finetune_model.FINETUNE_MODELS))
    a('--rel_pos_bias', action='store_true', help='BEiT relative position bias: not supported (clear error)')
    a('--disable_rel_pos_bias', action='store_false', dest='rel_pos_bias')
    a('--abs_pos_emb', action='store_true', help='absolute position embedding (required; SLIP towers have one)')
    p.set_defaults(rel_pos_bias=True, abs_pos_emb=False)  # BEiT's defaults: the SLIP recipes pass both flags
    a('--layer_scale_init_value', default=0.1, type=float, help='LayerScale init; 0 disables it (SLIP recipes)')
    a('--input_size', default=224, type=int)
    a('--drop', type=float, default=0.0, help='dropout before the head')
    a('--attn_drop_rate', type=float, default=0.0)
    a('--drop_path', type=float, default=0.1, help='stochastic depth rate (0.0 ViT-S, 0.1 ViT-B/L recipes)')
    a('--disable_eval_during_finetuning', action='store_true')
    a('--model_ema', action='store_true', help='keep an exponential moving average of the weights (timm ModelEmaV3)')
    a('--model_ema_decay', type=float, default=0.9999)
    a('--model_ema_force_cpu', action='store_true')
    a('--model_ema_eval', action='store_true', help='also evaluate the EMA weights each epoch')
    # Optimizer and schedule
    a('--opt', default='adamw', help='any timm optimizer name')
    a('--opt_eps', default=1e-8, type=float)
    a('--opt_betas', default=None, type=float, nargs='+')
    a('--clip_grad', type=float, default=None, help='max gradient norm (default: no clipping)')
    a('--momentum', type=float, default=0.9, help='SGD momentum')
    a('--weight_decay', type=float, default=0.05)
    a('--weight_decay_end', type=float, default=None, help='cosine-schedule weight decay to this (default: constant)')
    a('--lr', type=float, default=5e-4, help='peak learning rate of the head (not scaled by the batch size)')
    a('--layer_decay', type=float, default=0.9, help='lr of layer l = lr x layer_decay^(depth+1-l); block i is i+1')
    a('--warmup_lr', type=float, default=1e-6, help='learning rate at the first warm-up step')
    a('--min_lr', type=float, default=1e-6, help='floor of the cosine schedule')
    a('--warmup_epochs', type=int, default=5)
    a('--warmup_steps', type=int, default=-1, help='warm-up in optimizer steps; overrides --warmup_epochs if > 0')
    # Augmentation
    a('--color_jitter', type=float, default=0.4, help='ignored by timm when --aa is set')
    a('--aa', type=str, default='rand-m9-mstd0.5-inc1', help='RandAugment / AutoAugment policy ("none": off)')
    a('--smoothing', type=float, default=0.1, help='label smoothing')
    a('--train_interpolation', type=str, default='bicubic')
    a('--crop_pct', type=float, default=None, help='eval centre-crop fraction (224/256 below 384 px)')
    a('--reprob', type=float, default=0.25, help='random erasing probability')
    a('--remode', type=str, default='pixel')
    a('--recount', type=int, default=1)
    a('--resplit', action='store_true', help='accepted for compatibility (no effect, as in BEiT)')
    a('--mixup', type=float, default=0, help='mixup alpha; enabled if > 0')
    a('--cutmix', type=float, default=0, help='cutmix alpha; enabled if > 0')
    a('--cutmix_minmax', type=float, nargs='+', default=None)
    a('--mixup_prob', type=float, default=1.0)
    a('--mixup_switch_prob', type=float, default=0.5)
    a('--mixup_mode', type=str, default='batch', choices=['batch', 'pair', 'elem'])
    # Fine-tuning
    a('--finetune', default='', help='pre-trained checkpoint (SLIP, CLIP, SimCLR or a fine-tuned one): a path, a '
      'released name (slip_base_100ep, ...) or an http(s) URL')
    a('--model_key', default='model|module', help="'|'-separated entries holding the weights (else state_dict)")
    a('--model_prefix', default='', help='key prefix of the image tower, module.visual. for SLIP checkpoints')
    a('--init_scale', default=0.001, type=float, help='scale of the new head init')
    a('--use_mean_pooling', action='store_true')
    a('--use_cls', action='store_false', dest='use_mean_pooling', help='class-token pooling (SLIP recipes)')
    p.set_defaults(use_mean_pooling=True)
    a('--disable_weight_decay_on_rel_pos_bias', action='store_true', help='accepted; no relative bias exists')
    # Data
    a('--data_path', default='', type=str, help='IMNET: root with train/ and val/; image_folder: the train folder')
    a('--eval_data_path', default=None, type=str, help='IMNET: root with val/; image_folder: the eval folder')
    a('--nb_classes', default=0, type=int, help='number of classes (0: count the class folders)')
    a('--imagenet_default_mean_and_std', action='store_true', help='ImageNet mean/std (else 0.5/0.5)')
    a('--data_set', default='IMNET', choices=['CIFAR', 'IMNET', 'image_folder'])
    a('--output_dir', default='', help='where checkpoints and log.txt go (empty: nothing is saved)')
    a('--log_dir', default=None, help='TensorBoard directory')
    a('--device', default=None, help='cuda (default when available) or cpu')
    a('--precision', default=None, choices=utils.PRECISIONS, help='default: bf16 autocast where supported')
    a('--seed', default=0, type=int)
    a('--resume', default='', help='checkpoint to resume from (default: the newest in --output_dir)')
    a('--resume_override', '--resume-override', action='store_true', dest='resume_override',
      help='resume a checkpoint trained with other settings (model, data, batch, schedule, recipe, seed, precision); '
           'the differences are logged instead of stopping the run')
    a('--auto_resume', action='store_true')
    a('--no_auto_resume', action='store_false', dest='auto_resume')
    a('--save_ckpt', action='store_true')
    a('--no_save_ckpt', action='store_false', dest='save_ckpt')
    p.set_defaults(auto_resume=True, save_ckpt=True)
    a('--start_epoch', default=0, type=int)
    a('--eval', action='store_true', help='evaluate the loaded weights and exit')
    a('--dist_eval', action='store_true', help='accepted; evaluation is always split exactly over processes')
    a('--num_workers', default=10, type=int)
    a('--pin_mem', action='store_true')
    a('--no_pin_mem', action='store_false', dest='pin_mem')
    p.set_defaults(pin_mem=True)
    a('--benchmark_steps', default=0, type=int, help='time this many steps on synthetic data, print images/s, exit')
    # Distributed (torchrun / Slurm environment variables are read by utils.init_distributed_mode)
    a('--world_size', default=1, type=int)
    a('--local_rank', '--local-rank', default=-1, type=int, help='ignored: LOCAL_RANK is read from the environment')
    a('--dist_on_itp', action='store_true', help='accepted for compatibility; ignored')
    a('--dist_url', default='env://')
    a('--enable_deepspeed', action='store_true', help='accepted: runs the native PyTorch path')
    return p


# ----------------------------------------------------------------------------------------------------------------
# Setup, checkpoints, main
# ----------------------------------------------------------------------------------------------------------------
def build_model(args, device):
    model = finetune_model.create_finetune_model(
        args.model, args.nb_classes, args.input_size, use_cls=not args.use_mean_pooling,
        rel_pos_bias=args.rel_pos_bias, abs_pos_emb=args.abs_pos_emb,
        layer_scale_init_value=args.layer_scale_init_value, drop_rate=args.drop, attn_drop_rate=args.attn_drop_rate,
        drop_path_rate=args.drop_path, init_scale=args.init_scale)
    if args.finetune and not find_resume_checkpoint(args):  # a resumed run already holds fine-tuned weights
        finetune_model.load_pretrained(model, args.finetune, args.model_key, args.model_prefix)
    return model.to(device)


def build_optimizer(model, args):
    groups = finetune_model.param_groups_layer_decay(model, args.weight_decay, args.layer_decay)
    utils.logger.info('layer-wise lr scales: %s', sorted({(g['layer_id'], round(g['lr_scale'], 6)) for g in groups}))
    extra = dict(eps=args.opt_eps, momentum=args.momentum)
    if args.opt_betas:
        extra['betas'] = tuple(args.opt_betas)
    return create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, **extra)


def build_schedules(args, steps_per_epoch):
    """Per-step lr (linear warm-up from --warmup_lr, cosine to --min_lr) and weight decay (cosine to its end)."""
    total = args.epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps > 0 else args.warmup_epochs * steps_per_epoch
    if warmup > total:
        raise ValueError(f'warm-up ({warmup} steps) is longer than training ({total} steps)')
    # One "epoch" per step so a warm-up given in steps needs no rounding.
    lr = utils.cosine_scheduler(args.lr, args.min_lr, total, 1, warmup_epochs=warmup, start_warmup_value=args.warmup_lr)
    wd_end = args.weight_decay if args.weight_decay_end is None else args.weight_decay_end
    wd = utils.cosine_scheduler(args.weight_decay, wd_end, args.epochs, steps_per_epoch)
    return lr, wd, steps_per_epoch


def find_resume_checkpoint(args) -> str:
    """--resume, else (with auto-resume) checkpoint-last.pth or the highest checkpoint-<epoch>.pth in output_dir."""
    if args.resume or not (args.auto_resume and args.output_dir):
        return args.resume
    last = os.path.join(args.output_dir, 'checkpoint-last.pth')
    if os.path.isfile(last):
        return last
    numbered = [(int(m.group(1)), f) for f in glob.glob(os.path.join(args.output_dir, 'checkpoint-*.pth'))
                if (m := re.fullmatch(r'checkpoint-(\d+)\.pth', os.path.basename(f)))]
    return max(numbered)[1] if numbered else ''


# Arguments that change the training; resuming a checkpoint made with others stops unless --resume_override.
# (world_size x batch_size x update_freq decide the data split and the schedule; workers and logging may differ.)
RESUME_FIELDS = ('model', 'finetune', 'model_key', 'model_prefix', 'data_set', 'data_path', 'nb_classes', 'input_size',
                 'batch_size', 'update_freq', 'world_size', 'epochs', 'warmup_epochs', 'warmup_steps', 'lr',
                 'min_lr', 'warmup_lr', 'layer_decay', 'weight_decay', 'weight_decay_end', 'opt', 'opt_eps',
                 'opt_betas', 'momentum', 'clip_grad', 'drop', 'attn_drop_rate', 'drop_path', 'layer_scale_init_value',
                 'use_mean_pooling', 'init_scale', 'mixup', 'cutmix', 'cutmix_minmax', 'mixup_prob',
                 'mixup_switch_prob', 'mixup_mode', 'smoothing', 'aa', 'color_jitter', 'reprob', 'remode', 'recount',
                 'train_interpolation', 'model_ema', 'model_ema_decay', 'seed', 'precision')


def resume(args, model, optimizer, scaler, model_ema):
    """Restore weights, optimizer, scaler and EMA; returns (start_epoch, best_acc1).

    A checkpoint trained with other RESUME_FIELDS is refused, naming them, unless --resume_override (or --eval).
    """
    path = find_resume_checkpoint(args)
    if not path:
        return args.start_epoch, 0.0
    ckpt = zoo.load_checkpoint(path)
    if not args.eval:
        utils.check_resume_args(ckpt['args'], vars(args), RESUME_FIELDS, path, args.resume_override,
                                '--resume_override', dash=False)
    utils.load_state_dict_checked(model, ckpt['state_dict'], path, strict=True)
    if not args.eval and 'optimizer' in ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
        if ckpt.get('scaler'):
            scaler.load_state_dict(ckpt['scaler'])
        elif scaler.is_enabled():  # fp16: the loss scale is part of the optimizer state
            raise utils.CheckpointError(f'--resume {path!r} holds an optimizer but no "scaler" state, which '
                                        f'--precision amp (fp16 loss scaling) needs to continue exactly; resume with '
                                        f'the precision it was trained with')
        else:
            utils.logger.warning('--resume %s has no "scaler" state; none is needed for --precision %s', path,
                                 args.precision)
    if model_ema is not None:  # an EMA that was not saved restarts from the resumed weights
        model_ema.module.load_state_dict(ckpt.get('model_ema', ckpt['state_dict']))
    utils.logger.info('resumed from %s (epoch %s)', path, ckpt.get('epoch'))
    return int(ckpt.get('epoch', -1)) + 1, float(ckpt.get('best_acc1', 0.0))


def save(args, epoch, model, optimizer, scaler, model_ema, best_acc1, is_best):
    if not (args.output_dir and args.save_ckpt):
        return
    state = {'epoch': epoch, 'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(),
             'scaler': scaler.state_dict(), 'best_acc1': best_acc1, 'args': args}
    if model_ema is not None:
        state['model_ema'] = model_ema.module.state_dict()
    last = checkpoints.save_checkpoint(state, is_best, args.output_dir, 'checkpoint-last.pth', 'checkpoint-best.pth')
    if last and ((epoch + 1) % args.save_ckpt_freq == 0 or epoch + 1 == args.epochs):  # rank 0 wrote it
        checkpoints.link(last, os.path.join(args.output_dir, f'checkpoint-{epoch}.pth'))  # the same file, kept


def log_epoch(args, stats, writer):
    if not utils.is_main_process():
        return
    if args.output_dir:
        utils.append_json_line(os.path.join(args.output_dir, 'log.txt'), stats)
    if writer is not None:
        for k, v in stats.items():
            if isinstance(v, (int, float)) and k not in ('epoch', 'n_parameters'):
                writer.add_scalar(k, v, stats['epoch'])
        writer.flush()


def main(args):
    device = utils.init_distributed_mode(args)
    args.precision = args.precision or utils.default_precision(device)
    if args.enable_deepspeed:
        utils.logger.info('--enable_deepspeed: DeepSpeed is not needed; running native DDP + AdamW + autocast')
    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    data = (None, None)
    if not args.benchmark_steps:
        train_set, args.nb_classes = finetune_data.build_dataset(True, args)
        val_set = None if args.disable_eval_during_finetuning else finetune_data.build_dataset(False, args)[0]
        data = (train_set, val_set)
    elif not args.nb_classes:
        args.nb_classes = 1000
    mixup_fn = finetune_data.build_mixup(args)
    model = build_model(args, device)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device='cpu' if args.model_ema_force_cpu else None) \
        if args.model_ema else None
    optimizer = build_optimizer(model, args)
    scaler = utils.grad_scaler(args.precision, device)
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # smoothing is already in the mixed targets
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    utils.logger.info('model %s: %.2fM parameters, precision %s', args.model, n_parameters / 1e6, args.precision)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.benchmark_steps:
        return engine.benchmark(model, criterion, optimizer, scaler, device, args, mixup_fn)

    train_loader, val_loader = finetune_data.build_loaders(args, *data, utils.get_world_size(), utils.get_rank())
    total_batch = args.batch_size * args.update_freq * utils.get_world_size()
    steps_per_epoch = len(data[0]) // total_batch
    if steps_per_epoch == 0:
        raise ValueError(f'{len(data[0])} training images are fewer than one effective batch of {total_batch}')
    schedules = build_schedules(args, steps_per_epoch)
    utils.logger.info('effective batch %d (%d x %d accumulation x %d processes), %d steps/epoch, lr %.3g, '
                      'min_lr %.3g, layer_decay %s', total_batch, args.batch_size, args.update_freq,
                      utils.get_world_size(), steps_per_epoch, args.lr, args.min_lr, args.layer_decay)
    start_epoch, best_acc1 = resume(args, engine.unwrap(model), optimizer, scaler, model_ema)
    if args.eval:
        stats = engine.evaluate(val_loader, model, device, args.precision)
        utils.logger.info('accuracy on %d images: top-1 %.2f top-5 %.2f', len(data[1]), stats['acc1'],
                          stats['acc5'])
        return stats
    writer = None
    if args.log_dir and utils.is_main_process():
        from torch.utils.tensorboard import SummaryWriter  # imported lazily: only when asked for
        writer = SummaryWriter(args.log_dir)
    try:  # closed on every way out: a TensorBoard thread left running aborts the interpreter's exit
        stats = {}
        for epoch in range(start_epoch, args.epochs):
            train_loader.sampler.set_epoch(epoch)
            train_stats = engine.train_one_epoch(model, criterion, train_loader, optimizer, scaler, device, epoch, args,
                                          schedules, model_ema, mixup_fn)
            stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch, 'n_parameters': n_parameters}
            is_best = False
            if val_loader is not None:
                test_stats = engine.evaluate(val_loader, model, device, args.precision)
                is_best = test_stats['acc1'] > best_acc1
                best_acc1 = max(best_acc1, test_stats['acc1'])
                stats.update({f'test_{k}': v for k, v in test_stats.items()}, best_acc1=best_acc1)
                if model_ema is not None and args.model_ema_eval:
                    ema_stats = engine.evaluate(val_loader, model_ema.module, device, args.precision)
                    stats.update({f'test_ema_{k}': v for k, v in ema_stats.items()})
                utils.logger.info('epoch %d: top-1 %.2f top-5 %.2f (best top-1 %.2f)', epoch, test_stats['acc1'],
                                  test_stats['acc5'], best_acc1)
            save(args, epoch, engine.unwrap(model), optimizer, scaler, model_ema, best_acc1, is_best)
            log_epoch(args, stats, writer)
    finally:
        if writer is not None:
            writer.close()
    utils.barrier()
    return stats


if __name__ == '__main__':
    parser = argparse.ArgumentParser('BEiT-recipe fine-tuning', parents=[get_args_parser()])
    cli_args = parser.parse_args()
    if cli_args.output_dir:
        os.makedirs(cli_args.output_dir, exist_ok=True)
    main(cli_args)
