"""main.py --evaluate, and the --max-bad-fraction stop on a pre-training set with missing images."""
import argparse
import json
import os

import pytest
import torch

import main as main_script
import utils


def parse(*argv):
    parser = argparse.ArgumentParser(parents=[main_script.get_args_parser()])
    return parser.parse_args([str(a) for a in argv])


def tiny(out, catalog, *extra):
    return parse('--model', 'CLIP_TINY', '--batch-size', 8, '--epochs', 1, '--warmup-epochs', 0, '--workers', 0,
                 '--precision', 'fp32', '--output-dir', out, '--catalog', catalog, *extra)


def test_evaluate_reports_the_checkpoints_zero_shot_accuracy_and_trains_nothing(tmp_path, small_catalog):
    main_script.main(tiny(tmp_path, small_catalog, '--dataset', 'demo', '--demo-samples', 16, '--eval-dataset', 'demo'))
    trained = json.loads((tmp_path / 'log.txt').read_text())
    before = utils.load_checkpoint(str(tmp_path / 'checkpoint.pt'))
    stamp = os.stat(tmp_path / 'checkpoint.pt').st_mtime_ns
    stats = main_script.main(tiny(tmp_path, small_catalog, '--dataset', 'demo', '--demo-samples', 16,
                                  '--eval-dataset', 'demo', '--evaluate'))
    # the same weights evaluated on the same 64 demo images: the number the epoch's check logged
    assert stats['acc1'] == pytest.approx(trained['test_acc1']) and stats['acc5'] == pytest.approx(trained['test_acc5'])
    assert json.loads((tmp_path / 'eval_log.txt').read_text()) == stats
    assert os.stat(tmp_path / 'checkpoint.pt').st_mtime_ns == stamp  # nothing trained, nothing saved
    assert len((tmp_path / 'log.txt').read_text().splitlines()) == 1
    after = utils.load_checkpoint(str(tmp_path / 'checkpoint.pt'))
    assert all(torch.equal(before['state_dict'][k], after['state_dict'][k]) for k in before['state_dict'])


def test_evaluate_without_a_zero_shot_set_says_so(tmp_path, small_catalog):
    with pytest.raises(SystemExit, match='nothing to evaluate: no zero-shot dataset for SIMCLR_TINY'):
        main_script.main(tiny(tmp_path, small_catalog, '--model', 'SIMCLR_TINY', '--dataset', 'demo', '--evaluate'))


def _coco_with_missing_images(root, write_coco, present, total):
    """A COCO set of ``total`` images of which only the first ``present`` exist on disk."""
    meta = write_coco(root, {i: (80, 60, (30 * i % 256, 90, 160)) for i in range(present)},
                      [(i, f'photo {i}') for i in range(total)])
    return str(root), meta


def test_max_bad_fraction_stops_the_run_naming_the_flag(tmp_path, small_catalog, write_coco):
    root, meta = _coco_with_missing_images(tmp_path / 'coco', write_coco, present=4, total=16)  # 75% missing
    with pytest.raises(RuntimeError, match=r'of 16 images .* are missing or undecodable, more than '
                                           r'--max-bad-fraction 0.5: check --root and --metadata'):
        main_script.main(tiny(tmp_path / 'out', small_catalog, '--dataset', 'coco', '--root', root, '--metadata', meta,
                              '--eval-dataset', 'none', '--max-bad-fraction', 0.5))
    assert not (tmp_path / 'out' / 'checkpoint.pt').exists()  # stopped before the epoch's checkpoint


def test_bad_images_below_max_bad_fraction_are_counted_and_training_goes_on(tmp_path, small_catalog, write_coco):
    root, meta = _coco_with_missing_images(tmp_path / 'coco', write_coco, present=12, total=16)  # 25% missing
    stats = main_script.main(tiny(tmp_path / 'out', small_catalog, '--dataset', 'coco', '--root', root,
                                  '--metadata', meta, '--eval-dataset', 'none', '--max-bad-fraction', 0.9))
    assert stats['epoch'] == 0 and stats['train_bad_samples'] >= 4  # each missing image drawn is replaced, counted
