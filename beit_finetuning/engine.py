"""Fine-tuning engine: BEiT's per-step training loop, exact distributed evaluation and a throughput benchmark.

The loop follows BEiT's ``engine_for_finetuning``: learning rate and weight decay are set per optimizer step from
precomputed schedules (each group's lr times its layer-decay ``lr_scale``), gradients accumulate over
``--update_freq`` micro-batches (DDP all-reduces only on the last one), and the EMA follows each optimizer step.
"""
import json
import math
import statistics
import time
from contextlib import nullcontext

import torch

import utils


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def set_schedule(optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)
        if group['weight_decay'] > 0:  # groups without decay stay at 0
            group['weight_decay'] = weight_decay


def optimizer_step(model, optimizer, scaler, clip_grad):
    """Unscale, optionally clip, step and clear; returns the pre-clip gradient norm (None without clipping)."""
    grad_norm = None
    if clip_grad:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad).item()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def forward_backward(model, criterion, images, targets, scaler, args, device, sync: bool = True):
    """One micro-batch: autocast forward, loss / update_freq backward (no DDP all-reduce unless ``sync``)."""
    no_sync = getattr(model, 'no_sync', None)
    with (nullcontext() if sync or no_sync is None else no_sync()):
        with utils.autocast(args.precision, device):
            output = model(images)  # [B, classes]
            loss = criterion(output, targets)
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f'loss is {value} at rank {utils.get_rank()}; stopping (lower --lr or use --clip_grad)')
        scaler.scale(loss / args.update_freq).backward()
    return output, value


def train_one_epoch(model, criterion, loader, optimizer, scaler, device, epoch, args, schedules, model_ema=None,
                    mixup_fn=None):
    """BEiT's loop: per-step lr and weight decay, gradient accumulation over --update_freq micro-batches."""
    model.train()
    lr_schedule, wd_schedule, steps_per_epoch = schedules
    metrics = utils.MetricLogger(device)
    optimizer.zero_grad(set_to_none=True)
    for i, (images, targets) in enumerate(loader):
        step = i // args.update_freq
        if step >= steps_per_epoch:  # leftover micro-batches that would not complete an optimizer step
            break
        it = epoch * steps_per_epoch + step
        if i % args.update_freq == 0:
            set_schedule(optimizer, lr_schedule[it], wd_schedule[it])
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        labels = targets
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)  # soft targets [B, classes]
        boundary = (i + 1) % args.update_freq == 0
        output, loss = forward_backward(model, criterion, images, targets, scaler, args, device, sync=boundary)
        record = dict(loss=loss, lr=max(g['lr'] for g in optimizer.param_groups), weight_decay=wd_schedule[it])
        if mixup_fn is None:
            record['class_acc'] = (output.argmax(-1) == labels).float().mean().item()
        if boundary:
            grad_norm = optimizer_step(model, optimizer, scaler, args.clip_grad)
            if grad_norm is not None:
                record['grad_norm'] = grad_norm
            if model_ema is not None:
                model_ema.update(unwrap(model), step=it)
        metrics.update(n=images.shape[0], **record)
        if i % 50 == 0:
            utils.logger.info('epoch %d [%d/%d] %s', epoch, step, steps_per_epoch, metrics)
    metrics.synchronize()
    return metrics.averages()


@torch.no_grad()
def evaluate(loader, model, device, precision):
    """Loss, top-1 and top-5 over the whole eval set (each rank holds a disjoint shard; sums are exact)."""
    model.eval()
    criterion = torch.nn.CrossEntropyLoss()
    metrics = utils.MetricLogger(device)
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with utils.autocast(precision, device):
            output = model(images)
        acc1, acc5 = utils.accuracy(output.float(), targets, topk=(1, 5))
        metrics.update(n=images.shape[0], loss=criterion(output.float(), targets).item(), acc1=acc1, acc5=acc5)
    metrics.synchronize()
    return metrics.averages()


def benchmark(model, criterion, optimizer, scaler, device, args, mixup_fn):
    """Median images/s of full training steps (forward, backward, optimizer step) on random images."""
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    labels = torch.randint(0, args.nb_classes, (args.batch_size,), device=device)
    model.train()
    times = []
    for i in range(args.benchmark_steps + 2):  # the first two steps warm up allocators and kernels
        start = time.perf_counter()
        x, y = mixup_fn(images, labels) if mixup_fn is not None else (images, labels)
        forward_backward(model, criterion, x, y, scaler, args, device)
        optimizer_step(model, optimizer, scaler, args.clip_grad)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        utils.logger.info('benchmark step %d%s: %.3f s', i, ' (warm-up)' if i < 2 else '', elapsed)
        if i >= 2:
            times.append(elapsed)
    result = {'model': args.model, 'batch_size': args.batch_size, 'precision': args.precision, 'device': str(device),
              'threads': torch.get_num_threads(), 'step_s_median': statistics.median(times),
              'images_per_s': args.batch_size * utils.get_world_size() / statistics.median(times)}
    utils.logger.info('benchmark: %s', json.dumps(result))
    return result


