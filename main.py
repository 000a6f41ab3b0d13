"""SLIP / CLIP / SimCLR pre-training.

One GPU node (8 GPUs), the SLIP ViT-B/16 recipe on YFCC15M, with the paper's global batch of 4096 made exactly of
8 GPUs x 64 x 8 micro-batches (engine.py):
    torchrun --nproc_per_node=8 main.py --root /path/to/yfcc100m --metadata yfcc15m.pkl --model SLIP_VITB16 \
        --batch-size 64 --update-freq 8 --lr 3e-3 --wd 0.1 --output-dir output/slip_vitb16
CLIP: --model CLIP_VITB16 --lr 5e-4 --wd 0.5; SimCLR: --model SIMCLR_VITB16 --lr 3.2e-3 --wd 0.1.
Slurm: python run_with_submitit.py <the same flags> --nodes 8 --ngpus 8.
The demo, on a laptop CPU in minutes, on data generated in code:
    python main.py --dataset demo --model SLIP_TINY --output-dir output/demo (see README for the full command)

A killed run restarted with the same command continues from <output-dir>/checkpoint.pt at the exact next step. A run
that diverges rolls back to an earlier checkpoint and skips the data that led to it (guard.py; README "Long runs").
"""
import argparse
import dataclasses
import os
import time
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

import checkpoints
import datasets
import device_decode
import engine as engine_lib
import faults
import guard as guard_lib
import models
import progress
import train_data
import utils
import zoo
from options import get_args_parser  # noqa: F401 (the original's main.get_args_parser)
from utils import logger

def check_args(args):
    """Refuse bad flags at start-up with one message naming each of them (never a traceback later)."""
    errors = []
    for flag in ('batch_size', 'update_freq', 'print_freq', 'eval_freq', 'epochs', 'max_nonfinite'):
        if getattr(args, flag) < 1:
            errors.append(f'--{flag.replace("_", "-")} must be >= 1, got {getattr(args, flag)}')
    for flag in ('warmup_epochs', 'save_every_steps', 'workers', 'start_epoch'):
        if getattr(args, flag) < 0:
            errors.append(f'--{flag.replace("_", "-")} must be >= 0, got {getattr(args, flag)}')
    if args.warmup_epochs > args.epochs >= 1:
        errors.append(f'--warmup-epochs ({args.warmup_epochs}) must not exceed --epochs ({args.epochs})')
    if not 0 <= args.max_bad_fraction <= 1:
        errors.append(f'--max-bad-fraction must be within [0, 1], got {args.max_bad_fraction}')
    if args.dataset == 'wds' and args.wds_shuffle_buffer < 1:
        errors.append(f'--wds-shuffle-buffer must be >= 1, got {args.wds_shuffle_buffer}')
    try:
        models.resolve_name(args.model)
    except KeyError:
        errors.append(f'--model {args.model!r} is not a known model; known models: {", ".join(models.MODELS)}')
    if args.eval_dataset not in (None, '', 'none'):  # a catalogued set whose files are missing is only a warning
        import zeroshot
        catalog = zeroshot.load_assets(args.catalog, args.labels, args.templates)[0]
        if args.eval_dataset not in catalog:
            errors.append(f'--eval-dataset {args.eval_dataset!r} is not in the catalog {args.catalog or "(default)"}; '
                          f'known: {", ".join(catalog)} (or none)')
    for module in (checkpoints, guard_lib, faults, device_decode):
        module.check_args(args, errors)
    if errors:
        raise SystemExit('main.py: invalid arguments:\n  ' + '\n  '.join(errors))


def resolve_args(args, device):
    """Fill the defaults that depend on the model, the device or the dataset."""
    spec = models.get_spec(args.model)
    args.model = spec.name
    args.ssl_mlp_dim = args.ssl_mlp_dim or spec.ssl_mlp_dim
    args.ssl_emb_dim = args.ssl_emb_dim or spec.ssl_emb_dim
    args.precision = 'fp32' if args.disable_amp else (args.precision or utils.default_precision(device))
    if args.eval_dataset is None:
        args.eval_dataset = 'demo' if args.dataset == 'demo' else 'imagenet'
    if not spec.has_text:
        args.eval_dataset = 'none'  # SimCLR has no text tower: no zero-shot check
    resolve_view_args(args, spec)
    return spec


def resolve_view_args(args, spec):
    """Check --ssl-view-size, --ssl-mask-ratio and --clip-mask-ratio against the model; the view size defaults to
    the model's input size."""
    size = args.ssl_view_size
    args.ssl_mask_ratio, args.clip_mask_ratio = float(args.ssl_mask_ratio), float(args.clip_mask_ratio)
    for flag, ratio in (('--ssl-mask-ratio', args.ssl_mask_ratio), ('--clip-mask-ratio', args.clip_mask_ratio)):
        if not 0 <= ratio < 1:
            raise ValueError(f'{flag} must be in [0, 1), got {ratio}')
    ssl_options = size not in (None, spec.image_size) or args.ssl_mask_ratio
    if ssl_options and not spec.has_ssl:
        raise ValueError(f'--ssl-view-size and --ssl-mask-ratio need a model with SimCLR views; {spec.name} has none')
    if args.clip_mask_ratio and not spec.has_text:
        raise ValueError(f'--clip-mask-ratio needs a model with a CLIP view; {spec.name} has none')
    if (ssl_options or args.clip_mask_ratio) and spec.patch_size is None:
        raise ValueError(f'--ssl-view-size, --ssl-mask-ratio and --clip-mask-ratio need a ViT; {spec.name} is not one')
    if size is not None and not (0 < size <= spec.image_size and size % spec.patch_size == 0):
        raise ValueError(f'--ssl-view-size must be a positive multiple of {spec.name}\'s patch size '
                         f'({spec.patch_size}) not above its input size ({spec.image_size}), got {size}')
    args.ssl_view_size = size or spec.image_size


def build_model(args, device):
    """The bare model on ``device``; the engine wraps it in DDP and torch.compile."""
    model = models.create_model_from_args(args.model, vars(args)).to(device)
    if args.ssl_view_size not in (None, models.get_spec(args.model).image_size):
        models.set_dynamic_img_size(model.visual)  # the SimCLR views are smaller: resample the position embedding
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    # SyncBatchNorm needs CUDA; on CPU each rank keeps its own BN statistics
    if args.ssl_head_norm == 'syncbn' and args.distributed and device.type == 'cuda':
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_engine(model, args, device) -> engine_lib.Engine:
    """Loss, optimizer and the training engine of ``model`` (bench.py builds its step the same way)."""
    criterion = models.get_loss(args.model, args.ssl_temp, args.ssl_scale, args.legacy_clip_gather)
    return engine_lib.Engine(model, criterion, build_optimizer(model, args, device), device=device,
                             precision=args.precision, update_freq=args.update_freq,
                             legacy_update_freq=args.legacy_update_freq, max_nonfinite=args.max_nonfinite,
                             distributed=args.distributed, compile=args.compile,
                             compile_backend=args.compile_backend, compile_mode=args.compile_mode, defer_reads=True)


def build_optimizer(model, args, device):
    """AdamW; no weight decay for biases, norms, 1-d parameters and logit_scale (the original's rule)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or 'bias' in name or 'ln' in name or 'bn' in name
        (no_decay if skip else decay).append(p)
    groups = [{'params': decay, 'weight_decay': args.wd}, {'params': no_decay, 'weight_decay': 0.0}]
    impl = {'fused': True} if device.type in ('cuda', 'cpu') else {}  # one fused kernel: ~8x a per-tensor loop on CPU
    return torch.optim.AdamW(groups, lr=args.lr, betas=tuple(args.betas), eps=args.eps, **impl)


EpochSampler, EpochIndexed = train_data.EpochSampler, train_data.EpochIndexed  # their home is train_data.py


def zeroshot_setup(args, spec):
    """Load the zero-shot assets and check the eval dataset exists now, not after the first epoch."""
    if args.eval_dataset in (None, '', 'none'):
        return None
    import zeroshot
    assets = zeroshot.load_assets(args.catalog, args.labels, args.templates)
    try:
        datasets.get_downstream_dataset(assets[0], args.eval_dataset, False, None)
    except (datasets.DatasetMissing, KeyError) as e:
        logger.warning('zero-shot check disabled: %s. Training continues without it.', e)
        return None
    return assets


def run_zeroshot(model, args, assets, tokenizer, device):
    import zeroshot
    stats = zeroshot.zeroshot_dataset(model, args.eval_dataset, assets, tokenizer, device,
                                      batch_size=args.batch_size, workers=min(args.workers, 4))
    logger.info('0-shot %s: acc1 %.2f acc5 %.2f', args.eval_dataset, stats['acc1'], stats['acc5'])
    return stats


# Arguments that change what is trained: a resume with other values would silently change the model, the data split
# (world size x batch size x update-freq each decide which samples a rank and a BatchNorm batch see), the schedule
# index or the numerics. Workers, print frequency, logging and output paths may differ.
RESUME_FIELDS = ('model', 'ssl_mlp_dim', 'ssl_emb_dim', 'ssl_head_norm', 'ssl_scale', 'ssl_temp', 'legacy_clip_gather',
                 'dataset', 'root', 'metadata', 'train_num_samples', 'demo_samples', 'world_size', 'batch_size',
                 'update_freq', 'legacy_update_freq', 'epochs', 'warmup_epochs', 'lr', 'lr_start', 'lr_end', 'wd',
                 'betas', 'eps', 'seed', 'precision', 'device_augment', 'ssl_view_size', 'ssl_mask_ratio',
                 'clip_mask_ratio', 'inject_fault', 'decode_device')
# WebDataset: each DataLoader worker reads its own shards, so the number of workers decides the sample order too.
RESUME_FIELDS_WDS = ('workers', 'wds_shuffle_buffer')


def data_position(args, step: int) -> dict:
    """Where the epoch's data stream stands after ``step`` optimizer steps: batches taken per rank and, for wds,
    the samples each DataLoader worker of a rank has delivered (the loader takes batches round-robin from them)."""
    batches = step * args.update_freq
    pos = {'batches_per_rank': batches, 'batch_size': args.batch_size, 'world_size': args.world_size}
    if args.dataset == 'wds':
        workers = max(args.workers, 1)
        pos['samples_per_worker'] = [(batches // workers + (w < batches % workers)) * args.batch_size
                                     for w in range(workers)]
    return pos


def stored_settings(stored, args) -> dict:
    """A checkpoint's arguments as this release compares them on resume. Runs of the previous release with
    --decode-device stored --device-augment as on (main.py turned it on for them); with on-device decoding the option
    does not act (train_data.image_format), so such a checkpoint is compared as if it held this run's value."""
    stored = dict(utils.args_to_dict(stored))
    if stored.get('decode_device') not in (None, 'worker') and 'device_augment' in stored:
        stored['device_augment'] = args.device_augment
    return stored


def resume(args, model, optimizer, scaler, path=None):
    """Returns (start_epoch, start_step, best_acc1, record) from ``path``, --resume or <output-dir>/checkpoint.pt;
    ``record`` is the checkpoint's long-run state (skip list, rollbacks, lr scale, guard; guard.LongRun).

    Refuses (naming each field) a checkpoint trained with other training-defining arguments unless
    --resume-override; --evaluate only loads the weights. A rollback resumes through here too.
    """
    if path is None:
        path = zoo.resolve_checkpoint(args.resume) if args.resume else os.path.join(args.output_dir, 'checkpoint.pt')
    if not os.path.isfile(path):
        if args.resume:
            raise FileNotFoundError(f'--resume {args.resume!r}: no such checkpoint')
        return args.start_epoch, 0, 0.0, {}
    ckpt = utils.load_checkpoint(path)
    if not args.evaluate:
        fields = RESUME_FIELDS + (RESUME_FIELDS_WDS if args.dataset == 'wds' else ())
        utils.check_resume_args(stored_settings(ckpt['args'], args), vars(args), fields, path, args.resume_override)
        faults.check_resume(ckpt['args'], args, path)
        stored = ckpt.get('data_position')
        if stored and not args.resume_override and stored != data_position(args, ckpt.get('step', 0)):
            raise SystemExit(f'refusing to resume from {path}: its data position {stored} does not match this run '
                             f'({data_position(args, ckpt.get("step", 0))}); pass --resume-override to resume anyway')
    utils.load_state_dict_checked(model, ckpt['state_dict'], path)
    if 'optimizer' in ckpt and ckpt['optimizer']:
        optimizer.load_state_dict(ckpt['optimizer'])
    if 'scaler' in ckpt and ckpt['scaler']:
        scaler.load_state_dict(ckpt['scaler'])
    logger.info('=> resumed from %s (epoch %d, step %d)', path, ckpt.get('epoch', 0), ckpt.get('step', 0))
    record = {k: ckpt[k] for k in ('skip_steps', 'rollbacks', 'lr_scale', 'guard') if k in ckpt}
    return ckpt.get('epoch', 0), ckpt.get('step', 0), float(ckpt.get('best_acc1', 0.0)), record


@dataclasses.dataclass
class TrainState:
    """What ``train``, ``save`` and ``rollback`` share during a run, built once by ``main``."""
    model: nn.Module  # the bare model (the engine holds its DDP / compiled wrapper)
    engine: engine_lib.Engine  # loss, optimizer, scaler and the step
    run: guard_lib.LongRun  # long-run state: skip list, rollbacks, lr scale, the divergence guard
    manager: checkpoints.CheckpointManager
    loader: Any  # train_data.DeviceBatches: the epoch's batches, finished on ``device``
    sampler: Any  # what ``set_epoch(epoch, first_batch, batch_size)`` positions (train_data.build_train_loader)
    iters: int  # optimizer steps per epoch
    zs_assets: Optional[tuple]  # zeroshot.load_assets: (catalog, labels, templates); None: no zero-shot check
    tokenizer: Optional[utils.Tokenizer]  # None for a model without a text tower
    device: torch.device
    writer: progress.Writers


def save(args, t: TrainState, epoch, step, best_acc1, is_best=False):
    """Checkpoint at an optimizer-step boundary: ``step`` steps of ``epoch`` are done. ``t``: the run (main)."""
    t.engine.flush()  # every step before it is seen by the guard first (which may raise Divergence instead)
    for name, p in t.model.named_parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f'refusing to save a checkpoint: parameter {name} holds non-finite values')
    state = {'epoch': epoch, 'step': step, 'best_acc1': best_acc1, 'args': args,
             'data_position': data_position(args, step),  # checked on resume
             # 'module.' keys, as the original's DDP checkpoints: its tools and BEiT's --model_prefix expect them
             'state_dict': {'module.' + k: v for k, v in t.model.state_dict().items()},
             'optimizer': t.engine.optimizer.state_dict(), 'scaler': t.engine.scaler.state_dict(),
             **t.run.state_dict()}  # skip list, rollbacks, lr scale, the guard's window
    suspect = t.run.suspect_since(t.engine)  # keep the checkpoint a rollback of the suspected spike would need
    protect = divmod(suspect - 1, t.iters) if suspect else None
    t.manager.save(state, is_best, protect)


def train(args, t: TrainState, start_epoch, start_step, best_acc1):
    """The epoch loop from ``start_step`` steps of ``start_epoch``; returns (last epoch's stats, best_acc1)."""
    t.run.start(args, t.engine, start_epoch, start_step, t.iters)  # random streams and schedule, as on resume
    t.engine.on_result = lambda global_step: t.run.observe(t.engine, global_step)  # raises guard.Divergence
    stats = {}
    for epoch in range(start_epoch, args.epochs):
        first = start_step if epoch == start_epoch else 0
        t.sampler.set_epoch(epoch, first * args.update_freq, args.batch_size)  # skip what was already trained

        def on_step(step, epoch=epoch, best=best_acc1):
            if args.save_every_steps and step % args.save_every_steps == 0 and step < t.iters:
                save(args, t, epoch, step, best)

        train_stats = engine_lib.train_one_epoch(t.engine, t.loader, epoch, first, t.iters, args, t.writer,
                                                 on_step=on_step, skip=t.run.skip(epoch))
        val_stats = {}
        if t.zs_assets is not None and (epoch + 1) % args.eval_freq == 0:
            val_stats = run_zeroshot(t.model, args, t.zs_assets, t.tokenizer, t.device)
        acc1 = val_stats.get('acc1', -1.0)
        is_best = acc1 > best_acc1
        best_acc1 = max(acc1, best_acc1)
        save(args, t, epoch + 1, 0, best_acc1, is_best)
        stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                 **{f'test_{k}': v for k, v in val_stats.items()}, 'epoch': epoch, 'rollbacks': len(t.run.rollbacks)}
        if utils.is_main_process():
            utils.append_json_line(os.path.join(args.output_dir, 'log.txt'), stats)
        t.writer.scalars(stats, t.iters * (epoch + 1), prefix='epoch/')  # the step of the epoch's last update
    return stats, best_acc1


def rollback(args, t: TrainState, div, error):
    """Roll back a divergence: reload the newest checkpoint before it exactly as a resume does, record the skipped
    window (and the lr scale) and save that checkpoint again with them, so that a restart skips it too."""
    tic = time.perf_counter()
    path = t.run.rollback_target(t.manager, div, t.iters, error)  # SystemExit after --max-rollbacks
    epoch, step, best_acc1, record = resume(args, t.model, t.engine.optimizer, t.engine.scaler, path=path)
    t.engine.reset_state()
    t.run.load_state_dict(record, history=False)  # the guard's window from the checkpoint, this run's skip list
    entry = t.run.record(div, (epoch, step), t.iters)
    save(args, t, epoch, step, best_acc1)
    t.manager.wait()
    t.run.log_rollback(entry, time.perf_counter() - tic, args.output_dir)
    return epoch, step, best_acc1


def main(args):
    check_args(args)
    device = utils.init_distributed_mode(args)
    spec = resolve_args(args, device)
    torch.manual_seed(args.seed + args.rank)
    np.random.seed(args.seed + args.rank)
    model = build_model(args, device)
    engine = build_engine(model, args, device)
    tokenizer = utils.Tokenizer() if spec.has_text else None
    zs_assets = zeroshot_setup(args, spec)
    run = guard_lib.LongRun(args)
    start_epoch, start_step, best_acc1, record = resume(args, model, engine.optimizer, engine.scaler)
    run.load_state_dict(record)
    if args.evaluate:
        if zs_assets is None:
            raise SystemExit(f'nothing to evaluate: no zero-shot dataset for {args.model} ({args.eval_dataset})')
        stats = run_zeroshot(model, args, zs_assets, tokenizer, device)
        if utils.is_main_process():
            utils.append_json_line(os.path.join(args.output_dir, 'eval_log.txt'), stats)
        return stats
    loader, sampler, iters_per_epoch = train_data.build_train_loader(args, tokenizer, device)
    iters_per_epoch //= args.update_freq  # trailing micro-batches that cannot fill an optimizer step are dropped
    if iters_per_epoch == 0:
        raise ValueError('the dataset is smaller than one optimizer step of batch-size x update-freq x processes')
    plan = faults.install(engine, args)
    kill = (lambda e, s: plan.kill_during_save(e * iters_per_epoch + s - 1)) if plan else None
    manager = checkpoints.CheckpointManager(args.output_dir, args.keep_checkpoints, args.save_every_epochs,
                                            args.async_save, kill)
    manager.reserve(checkpoints.state_like(model, engine.optimizer))  # the saves' host buffers, once, before step 1
    t = TrainState(model=model, engine=engine, run=run, manager=manager, loader=loader, sampler=sampler,
                   iters=iters_per_epoch, zs_assets=zs_assets, tokenizer=tokenizer, device=device,
                   writer=progress.Writers(args))
    accumulation = '' if args.update_freq == 1 else \
        (' (legacy: per-micro-batch losses)' if args.legacy_update_freq else ' (exact accumulation)')
    logger.info('%s: %d processes x batch %d x update-freq %d = global batch %d%s; %d steps/epoch; precision %s; '
                'peak lr %g', args.model, args.world_size, args.batch_size, args.update_freq,
                args.world_size * args.batch_size * args.update_freq, accumulation, iters_per_epoch, args.precision,
                args.lr * run.lr_scale)
    try:
        while True:
            try:
                stats, best_acc1 = train(args, t, start_epoch, start_step, best_acc1)
                break
            except (guard_lib.Divergence, engine_lib.NonFiniteStreak) as e:
                div, error = run.as_divergence(e), str(e)  # plain data: the aborted epoch's frames are released
            start_epoch, start_step, best_acc1 = rollback(args, t, div, error)
    finally:  # also on the way out of a requeue's SystemExit: no writer thread may outlive main
        manager.close()
        t.writer.close()
    if zs_assets is not None:
        logger.info('done: zero-shot top-1 on %s %.2f%% (best %.2f%%); outputs in %s', args.eval_dataset,
                    stats.get('test_acc1', float('nan')), best_acc1, args.output_dir)
    utils.cleanup_distributed()
    return stats


if __name__ == '__main__':
    parser = argparse.ArgumentParser('SLIP pre-training', parents=[get_args_parser()])
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    main(args)
