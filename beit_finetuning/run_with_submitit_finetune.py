"""Slurm launcher (submitit) for fine-tuning, beit_finetuning/run_class_finetuning.py; the logic is in
run_with_submitit.py at the repository root.

The seed's ViT-B recipe on one node x 8 GPUs (the defaults: 1 node, 8 GPUs, 2800 minutes, job name "beit"):
    export SLIP_SHARED_DIR=/checkpoint/$USER/experiments/slip     # or --shared-dir
    python beit_finetuning/run_with_submitit_finetune.py \
        --batch_size 128 --enable_deepspeed --epochs 100 --warmup_epochs 20 --model beit_base_patch16_224 \
        --nb_classes 1000 --imagenet_default_mean_and_std --model_key state_dict --model_prefix module.visual. \
        --disable_rel_pos_bias --abs_pos_emb --use_cls --mixup 0.8 --cutmix 1 --layer_scale_init_value 0 \
        --lr 4e-3 --drop_path 0.1 --layer_decay 0.65 --data_path /path/to/imagenet \
        --finetune /path/to/slip_base_100ep.pt
What the node runs, without Slurm:
    torchrun --nproc_per_node=8 beit_finetuning/run_class_finetuning.py <the same flags> --output_dir <job folder>
A preempted or timed-out job requeues itself and resumes from <job folder>/checkpoint-last.pth (docs/SLURM.md).
"""
import os
import sys

if __package__ in (None, ''):  # run as a file: the launcher and the stages live at the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_with_submitit  # noqa: E402

STAGE = 'finetune'


def get_args_parser():
    """The launcher's flags plus every flag of run_class_finetuning.py."""
    return run_with_submitit.get_args_parser(STAGE)


def main(args):
    return run_with_submitit.main(args)


if __name__ == '__main__':
    main(run_with_submitit.parse_args(STAGE))
