"""main.py's command line: the parser, where each option's default is stated (its only place), and ``complete``,
which gives arguments made elsewhere the options they lack.

Arguments reach the library modules from main.py's parser, but also from the original's code (``datasets.get_dataset``
with its own main.py's arguments), from tests and from benchmarks; a module that reads an option such arguments may
lack calls ``complete`` once instead of restating the option's default.
"""
import argparse
import os
from typing import Any

import checkpoints
import engine
import faults
import guard as guard_lib
import models
import utils


def get_args_parser():
    """main.py's options (``main.get_args_parser``, the original's call, is this function)."""
    p = argparse.ArgumentParser('SLIP pre-training', add_help=False)
    a = p.add_argument
    # data
    a('--dataset', default='yfcc15m', choices=['yfcc15m', 'cc3m', 'cc12m', 'coco', 'redcaps', 'wds', 'demo'])
    a('--root', default='', help='dataset root; for wds the shard pattern, e.g. "shards/{00000..00331}.tar"')
    a('--metadata', default='yfcc15m.pkl', help='metadata file (pickle, npy or json, see README)')
    a('--metadata-cache', default=os.path.join(os.environ.get('XDG_CACHE_HOME') or '~/.cache', 'slip', 'metadata'),
      help='folder where the parsed metadata is cached once per node and memory-mapped by every process '
           '(default: $XDG_CACHE_HOME/slip/metadata or ~/.cache/slip/metadata; none: parse it in every process)')
    a('--train-num-samples', type=int, default=None, help='wds only: samples per epoch over all shards')
    a('--wds-shuffle-buffer', type=int, default=1000,
      help='wds only: samples each data loader worker holds for its seeded shuffle (raw bytes; decoded after the draw)')
    a('--demo-samples', type=int, default=20000, help='demo only: generated image-caption pairs per epoch')
    a('--max-bad-fraction', type=float, default=0.01,
      help='stop when more than this fraction of an epoch\'s images are missing or undecodable (they are skipped)')
    a('--output-dir', default='./', type=str)
    # model and loss
    a('--model', default='SLIP_VITB16', type=str, help=f'one of {", ".join(models.MODELS)}')
    a('--ssl-mlp-dim', default=None, type=int, help='SimCLR head hidden width (default 4096; 256 for *_TINY)')
    a('--ssl-emb-dim', default=None, type=int, help='SimCLR head output width (default 256; 64 for *_TINY)')
    a('--ssl-head-norm', default='syncbn', choices=['syncbn', 'bn', 'ln', 'none'],
      help='normalisation in the SimCLR head: BatchNorm synchronised across GPUs (the original, default), BatchNorm '
           'with per-GPU statistics, LayerNorm or none (no batch statistics; ln/none change the head\'s keys)')
    a('--ssl-scale', default=1.0, type=float, help='weight of the SimCLR loss in SLIP: clip_loss + scale * ssl_loss')
    a('--ssl-temp', default=0.1, type=float, help='softmax temperature of the SimCLR loss')
    a('--ssl-view-size', default=None, type=int,
      help='pixels of the two SimCLR views (default: the model\'s input size); e.g. 112 or 160 for a 224 model: the '
           'ViT resamples its position embeddings for them (timm), the CLIP view stays at full size')
    a('--ssl-mask-ratio', default=0.0, type=float,
      help='share of each SimCLR view\'s patch tokens dropped before the ViT blocks (0: none); the class token and '
           'round((1 - ratio) x patches) random patches are kept, drawn per sample from its seeded generator')
    a('--clip-mask-ratio', default=0.0, type=float,
      help='the same for the CLIP view, in training only (FLIP); evaluation always sees every patch')
    a('--legacy-clip-gather', action='store_true',
      help='gather CLIP features without gradient as the original did (incomplete multi-GPU gradient; only for '
           'exact reproduction of the released runs)')
    # optimisation
    a('--resume', default='', type=str,
      help='checkpoint to resume from: a path, a released name (zoo.py) or an http(s) URL (default: '
           '<output-dir>/checkpoint.pt)')
    a('--resume-override', action='store_true',
      help='resume even when the checkpoint was trained with other settings (model, data, batch, schedule, seed, '
           'precision: see README); the differences are logged. Without it such a resume stops, naming them')
    a('--epochs', default=25, type=int)
    a('--warmup-epochs', default=1, type=int)
    a('--start-epoch', default=0, type=int)
    a('--batch-size', default=64, type=int, help='per process')
    a('--lr', default=3e-3, type=float, help='peak learning rate')
    a('--lr-start', default=1e-6, type=float, help='learning rate at the start of warm-up')
    a('--lr-end', default=1e-5, type=float, help='floor of the cosine schedule')
    a('--update-freq', default=1, type=int,
      help='micro-batches per optimizer step: the same training as one batch this many times larger (exact: the '
           'towers run twice, the loss and the SSL head once on the whole batch; see engine.py)')
    a('--legacy-update-freq', action='store_true',
      help='the original\'s --update-freq: each micro-batch is its own contrastive batch with its own BatchNorm '
           'statistics (only for exact reproduction of its runs)')
    a('--wd', default=0.1, type=float)
    a('--betas', default=(0.9, 0.98), nargs=2, type=float)
    a('--eps', default=1e-8, type=float)
    a('--max-nonfinite', default=5, type=int, help='stop after this many consecutive steps with a non-finite loss')
    # evaluation, checkpoints, logging
    a('--eval-freq', default=1, type=int, help='epochs between zero-shot checks (a checkpoint is saved every epoch)')
    a('--eval-dataset', default=None,
      help='catalog dataset for the zero-shot check (default imagenet; demo for --dataset demo; none disables)')
    a('--catalog', default=None, help='dataset_catalog.json (default: beside this script)')
    a('--labels', default=None, help='labels.json (default: beside this script)')
    a('--templates', default=None, help='templates.json (default: beside this script)')
    a('--save-every-steps', default=0, type=int, help='also checkpoint every N optimizer steps within an epoch')
    checkpoints.add_args(p)  # --keep-checkpoints, --save-every-epochs, --async-save
    guard_lib.add_args(p)  # --divergence-guard, --guard-*, --max-rollbacks, --rollback-lr-factor
    faults.add_args(p)  # --inject-fault, --allow-fault-injection
    a('--print-freq', default=10, type=int, help='optimizer steps between progress lines')
    a('--evaluate', action='store_true', help='zero-shot evaluation only')
    a('--wandb', action='store_true', help='log to Weights & Biases (imported only then)')
    # system
    a('--device', default=None, help='cuda (default when available) or cpu')
    a('--precision', default=None, choices=utils.PRECISIONS,
      help='amp (fp16 + loss scaling), amp_bf16 (default where supported) or fp32')
    a('--disable-amp', action='store_true', help='same as --precision fp32')
    a('--compile', action='store_true',
      help='torch.compile the model and loss whole (fullgraph; one graph per text length, see --text-pad-multiple)')
    a('--compile-backend', default='inductor',
      help='torch.compile\'s backend with --compile: inductor; aot_eager or eager trace the same graphs without '
           'generating code (to tell a compiler bug from a model bug)')
    a('--compile-mode', default='default', choices=engine.COMPILE_MODES,
      help='torch.compile\'s mode with --compile: reduce-overhead replays each graph as a CUDA graph (on CUDA; one '
           'launch per graph instead of one per kernel), max-autotune also tunes the matmuls')
    a('--text-pad-multiple', default=16, type=int,
      help='the collate cuts a batch\'s token ids to its longest caption rounded up to this multiple (at most 77), '
           'so the text tower\'s shape is known on the host; 0 keeps all 77 tokens')
    a('--grad-checkpointing', action='store_true', help='recompute activations in backward to save memory')
    a('-j', '--workers', default=10, type=int, help='data loader workers per process')
    a('--device-augment', action='store_true',
      help='SimCLR colour jitter, grayscale and blur run batched on the device instead of in the workers with PIL '
           '(same distributions, other numerics; for input-bound runs)')
    a('--decode-device', default='worker', choices=['worker', 'cpu', 'cuda'],
      help='where JPEGs are decoded and the views cropped and resized: worker (PIL in the data loader workers, '
           'default); cuda (the workers send the compressed bytes and drawn crops, the GPU decodes the batch with '
           'nvImageCodec, or torchvision\'s nvJPEG call without it, and makes the views one batch ahead on a stream '
           'of its own; the SimCLR colour ops run there as with --device-augment); cpu (the same code on the CPU in '
           'the main process)')
    a('--world-size', default=1, type=int, help='number of processes (set by the launchers)')
    a('--rank', default=0, type=int)
    a('--local_rank', '--local-rank', default=0, type=int, dest='local_rank')
    a('--dist-url', default='env://', type=str)
    a('--dist-backend', default='nccl', type=str, help='nccl on CUDA; CPU runs always use gloo')
    a('--seed', default=0, type=int)
    a('--gpu', default=None, type=int)
    return p


def defaults() -> dict:
    """Every option of main.py's parser with its default (read from the parser each call: some follow the
    environment, e.g. --metadata-cache)."""
    return vars(get_args_parser().parse_args([]))


def complete(args: Any, **absent: Any) -> argparse.Namespace:
    """A copy of ``args`` (a namespace) with every option of main.py's parser that it lacks, at the parser's default,
    or at ``absent``'s value for the options named there (where a missing option means something else: the
    original's runs had no metadata cache). ``args`` itself is left as it is."""
    return argparse.Namespace(**{**defaults(), **absent, **vars(args)})
