"""Every bad flag stops the run at start-up with a message that names it (never a traceback or a later crash)."""
import argparse

import pytest
import torch

import datasets
import main as main_script
import models
from beit_finetuning import run_class_finetuning as rcf


def parse_main(*argv):
    parser = argparse.ArgumentParser(parents=[main_script.get_args_parser()])
    return parser.parse_args([str(a) for a in argv])


def demo_args(out, *extra):
    return parse_main('--dataset', 'demo', '--model', 'CLIP_TINY', '--demo-samples', 16, '--batch-size', 8,
                      '--epochs', 1, '--warmup-epochs', 0, '--workers', 0, '--precision', 'fp32',
                      '--eval-dataset', 'none', '--output-dir', out, *extra)


@pytest.mark.parametrize('flag', ['--update-freq', '--batch-size', '--print-freq', '--eval-freq', '--epochs'])
@pytest.mark.parametrize('value', [0, -1])
def test_non_positive_counts_are_refused_naming_the_flag(tmp_path, flag, value):
    with pytest.raises(SystemExit, match=f'{flag} must be >= 1, got {value}'):
        main_script.main(demo_args(tmp_path, flag, value))
    assert not (tmp_path / 'checkpoint.pt').exists()


def test_warmup_longer_than_training_is_refused_naming_both_flags(tmp_path):
    with pytest.raises(SystemExit, match=r'--warmup-epochs \(3\) must not exceed --epochs \(2\)'):
        main_script.main(demo_args(tmp_path, '--epochs', 2, '--warmup-epochs', 3))


def test_negative_save_every_steps_is_refused(tmp_path):
    with pytest.raises(SystemExit, match='--save-every-steps must be >= 0, got -1'):
        main_script.main(demo_args(tmp_path, '--save-every-steps', -1))


def test_every_bad_flag_is_named_in_one_message(tmp_path):
    with pytest.raises(SystemExit) as info:
        main_script.main(demo_args(tmp_path, '--update-freq', 0, '--print-freq', 0, '--save-every-steps', -2))
    assert all(f in str(info.value) for f in ('--update-freq', '--print-freq', '--save-every-steps'))


def test_unknown_model_is_refused_with_the_list_of_names(tmp_path):
    with pytest.raises(SystemExit, match="--model 'SLIP_VITX16' is not a known model; known models: CLIP_VITS16") \
            as info:
        main_script.main(demo_args(tmp_path, '--model', 'SLIP_VITX16'))
    assert all(name in str(info.value) for name in models.MODELS)


def test_model_constructor_rejects_a_keyword_it_does_not_take():
    with pytest.raises(TypeError, match='CLIP_TINY got unexpected keyword argument.*fuse_view\\b'):
        models.create_model('CLIP_TINY', fuse_view=False)  # a typo of fuse_views
    with pytest.raises(TypeError, match='SIMCLR_TINY got unexpected keyword argument.*vocab_size'):
        models.create_model('SIMCLR_TINY', vocab_size=10)  # SimCLR has no text tower
    with pytest.raises(TypeError, match='CLIP_RN50 got unexpected keyword argument.*embed_dimm'):
        models.CLIP_RN50(embed_dimm=3)
    model = models.create_model('SLIP_TINY', rand_embed=False, fuse_views=False)  # the original eval script's kwarg
    assert model.fuse_views is False


def test_eval_dataset_not_in_the_catalog_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="--eval-dataset 'imagenet_typo' is not in the catalog.*known: .*imagenet"):
        main_script.main(demo_args(tmp_path, '--eval-dataset', 'imagenet_typo'))
    assert not (tmp_path / 'log.txt').exists()  # refused before training, not after the first epoch


def test_unknown_special_dataset_name_is_an_error_naming_it():
    catalog = {'svhn': {'path': '/data/svhn', 'type': 'special', 'train': 'train', 'test': 'test'}}
    with pytest.raises(ValueError, match="'svhn' has type \"special\", which only cifar10, cifar100, stl10, mnist"):
        datasets.get_downstream_dataset(catalog, 'svhn', False, None)


def test_finetune_checkpoint_without_scaler_state_is_refused_for_fp16(tmp_path):
    parser = argparse.ArgumentParser(parents=[rcf.get_args_parser()])
    path = tmp_path / 'checkpoint-last.pth'
    args = parser.parse_args(['--resume', str(path), '--precision', 'amp', '--device', 'cpu'])
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {'epoch': 3, 'state_dict': model.state_dict(), 'optimizer': optimizer.state_dict(), 'args': vars(args)}
    torch.save(state, path)  # e.g. written by another tool: no 'scaler' entry
    scaler = torch.amp.GradScaler('cpu', enabled=True)
    with pytest.raises(Exception, match=r'--resume .*checkpoint-last.pth.* no "scaler" state.*--precision amp'):
        rcf.resume(args, model, optimizer, scaler, None)
    # bf16 / fp32 need no scaler: the same file resumes
    args.precision = 'amp_bf16'
    args.resume_override = True  # the precision differs from the file's (checked separately)
    assert rcf.resume(args, model, optimizer, torch.amp.GradScaler('cpu', enabled=False), None) == (4, 0.0)


def test_complete_fills_only_the_missing_options_from_the_parser_defaults():
    import options
    loose = argparse.Namespace(model='CLIP_TINY', seed=7, image_format='uint8')
    full = options.complete(loose, metadata_cache=None)
    defaults = vars(main_script.get_args_parser().parse_args([]))
    assert (full.model, full.seed, full.image_format) == ('CLIP_TINY', 7, 'uint8')  # given: kept, extras too
    assert (full.demo_samples, full.wds_shuffle_buffer, full.ssl_mask_ratio) == \
        (defaults['demo_samples'], defaults['wds_shuffle_buffer'], defaults['ssl_mask_ratio'])
    assert full.metadata_cache is None and defaults['metadata_cache'] is not None  # absent= overrides the default
    assert vars(loose) == {'model': 'CLIP_TINY', 'seed': 7, 'image_format': 'uint8'}  # a copy: args left as they are
    assert set(vars(options.complete(argparse.Namespace()))) == set(defaults)
