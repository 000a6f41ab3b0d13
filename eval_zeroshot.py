"""Zero-shot evaluation of a CLIP or SLIP checkpoint: the 26 classification datasets of SLIP, plus retrieval.

Commands:
    python eval_zeroshot.py --resume slip_base_25ep.pt --output-dir out/eval          # the 26 datasets of the paper
    python eval_zeroshot.py --resume ckpt.pt --datasets imagenet imagenet80 coco_retrieval flickr30k_retrieval
    torchrun --nproc_per_node=8 eval_zeroshot.py --resume ckpt.pt --output-dir out/eval  # each rank one shard

The protocol (SLIP's: ImageNet-normalised centre crops, cosine logits against averaged prompt embeddings, the
paper's metric per dataset; Recall@1/5/10 for retrieval) lives in zeroshot.py, the evaluation library. This script is
its command line; the library's names stay importable from here (``eval_zeroshot.build_classifier``, ...) and are
the library's own objects, so a patch meant to change how zero-shot evaluation runs goes on ``zeroshot``.

``--datasets`` takes catalog names; ``imagenet80`` is an alias of ``imagenet`` with CLIP's 80 prompt templates
(``templates.json`` key ``imagenet_80``). A catalog entry may name its ``labels`` / ``templates`` keys and its
``metric``. Results: ``<output-dir>/zeroshot_results.json`` maps each dataset to its metric (``null`` when its files
are missing); retrieval sets add ``"<name>/image_retrieval_recall@K"`` and ``"<name>/text_retrieval_recall@K"``.
"""
import argparse
import json
import os
import time
from typing import Dict, Optional

import datasets
import utils
import zoo
from utils import logger
from zeroshot import (HERE, IMAGENET_MEAN, IMAGENET_STD, METRICS, NO_TEXT_TOWER, PAPER_DATASETS,  # noqa: F401
                      RECALL_AT, ImageList, build_classifier, classification_metrics, encode_images, encode_texts,
                      eval_mode, eval_transform, evaluate_retrieval, gather_shards, load_assets, load_model,
                      load_retrieval_split, mean_per_class_accuracy, model_image_size, resolve_entry, retrieval_recall,
                      roc_auc, shard, text_model_spec, to_rgb, zeroshot_dataset)  # (re-exported: the library's names)


def get_args_parser():
    parser = argparse.ArgumentParser('SLIP zero-shot evaluation', add_help=False)
    parser.add_argument('--resume', default='', type=str,
                        help='checkpoint to evaluate: a path, a released name (slip_base_100ep, ...) or an '
                             'http(s) URL; default <output-dir>/checkpoint_best.pt')
    parser.add_argument('--datasets', nargs='+', default=None, metavar='NAME',
                        help='catalog names to evaluate (default: the 26 of the paper); also imagenet80, demo, '
                             'coco_retrieval, coco2017_retrieval, flickr30k_retrieval')
    parser.add_argument('--catalog', default=None, help='dataset_catalog.json (default: the one beside this script)')
    parser.add_argument('--labels', default=None, help='labels.json (default: the one beside this script)')
    parser.add_argument('--templates', default=None, help='templates.json (default: the one beside this script)')
    parser.add_argument('--output-dir', default='./', type=str, help='where zeroshot_results.json is written')
    parser.add_argument('--batch-size', default=256, type=int, help='images per batch and process')
    parser.add_argument('-j', '--workers', default=utils.default_workers(), type=int,
                        help='data loader workers per process (default: the cores available, at most 10)')
    parser.add_argument('--precision', default='fp32', choices=utils.PRECISIONS,
                        help='fp32 as in the original; amp_bf16 is faster and agrees to ~0.1 point')
    parser.add_argument('--device', default=None, help='cpu, cuda or cuda:N (default: cuda when available)')
    parser.add_argument('--world-size', default=1, type=int, help='number of processes (Slurm launch only)')
    parser.add_argument('--dist-url', default='env://', type=str)
    return parser


def main(args) -> Dict[str, Optional[float]]:
    device = utils.init_distributed_mode(args)
    assets = load_assets(args.catalog, args.labels, args.templates)
    names = args.datasets or [n for n in PAPER_DATASETS if n in assets[0]]  # the 26 (those the catalog has)
    unknown = [n for n in names if n not in assets[0]]
    if unknown:
        raise ValueError(f'--datasets: {unknown} not in the catalog (known: {", ".join(assets[0])})')
    path = zoo.resolve_checkpoint(args.resume) if args.resume else os.path.join(args.output_dir, 'checkpoint_best.pt')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no checkpoint at {path!r}: pass --resume CKPT or --output-dir of a training run')
    model, _ = load_model(path, device)
    tokenizer = utils.Tokenizer()
    results: Dict[str, Optional[float]] = {}
    rows = []
    for k, name in enumerate(names, 1):
        logger.info('set %d of %d: %s', k, len(names), name)
        start = time.time()
        try:
            stats = zeroshot_dataset(model, name, assets, tokenizer, device, args.batch_size, args.workers,
                                     args.precision)
        except datasets.DatasetMissing as e:
            logger.warning('%s: missing, skipped (%s)', name, e)
            results[name] = None
            rows.append((name, 'missing', time.time() - start))
            continue
        results[name] = stats['metric']
        results.update({f'{name}/{k}': v for k, v in stats.items() if '@' in k})
        rows.append((name, f'{stats["metric"]:.1f}', time.time() - start))
        logger.info('%s: %s', name, ', '.join(f'{k} {v:.2f}' for k, v in stats.items()))
    if utils.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, 'zeroshot_results.json'), 'w') as f:
            json.dump(results, f, indent=2)
        logger.info('%-22s%10s%10s', 'dataset', 'metric', 'seconds')
        for row in rows:
            logger.info('%-22s%10s%10.1f', *row)
    return results


if __name__ == '__main__':
    parser = argparse.ArgumentParser('SLIP zero-shot evaluation', parents=[get_args_parser()])
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    main(args)
