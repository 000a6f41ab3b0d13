"""zeroshot.py, the evaluation library: what eval_zeroshot.py re-exports, the one model check, the one set of
ImageNet statistics. Its metrics, classifier and retrieval are tested in tests/test_eval_zeroshot.py."""
import ast
import pathlib

import pytest
import torch

import augment
import eval_zeroshot
import export_open_clip
import models
import utils
import zeroshot

REPO = pathlib.Path(__file__).resolve().parent.parent
# Every public name eval_zeroshot.py had when it held the library (before zeroshot.py), but its own two.
LIBRARY_NAMES = [
    'HERE', 'PAPER_DATASETS', 'METRICS', 'RECALL_AT', 'IMAGENET_MEAN', 'IMAGENET_STD', 'load_assets', 'resolve_entry',
    'to_rgb', 'eval_transform', 'model_image_size', 'eval_mode', 'encode_texts', 'build_classifier', 'shard',
    'gather_shards', 'encode_images', 'mean_per_class_accuracy', 'roc_auc', 'classification_metrics',
    'retrieval_recall', 'ImageList', 'load_retrieval_split', 'evaluate_retrieval', 'zeroshot_dataset', 'load_model']


@pytest.mark.parametrize('name', LIBRARY_NAMES)
def test_eval_zeroshot_reexports_each_library_name_as_the_librarys_own_object(name):
    assert getattr(eval_zeroshot, name) is getattr(zeroshot, name)


def test_eval_zeroshot_keeps_only_its_command_line():
    defined = [node.name for node in ast.parse((REPO / 'eval_zeroshot.py').read_text()).body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert defined == ['get_args_parser', 'main']


def test_imagenet_statistics_are_assigned_in_augment_only():
    assigned = sorted(path.name for path in REPO.glob('*.py') for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, ast.Assign) and any(
                          isinstance(n, ast.Name) and n.id in ('IMAGENET_MEAN', 'IMAGENET_STD')
                          for t in node.targets for n in ast.walk(t)))
    assert assigned == ['augment.py']
    for module in (zeroshot, eval_zeroshot, export_open_clip):
        assert (module.IMAGENET_MEAN, module.IMAGENET_STD) == (augment.IMAGENET_MEAN, augment.IMAGENET_STD)
        assert module.IMAGENET_MEAN is augment.IMAGENET_MEAN and module.IMAGENET_STD is augment.IMAGENET_STD


def test_text_model_spec_reads_args_model_and_a_name_overrides_it():
    assert zeroshot.text_model_spec({'args': {'model': 'CLIP_TINY'}}, 'c.pt').name == 'CLIP_TINY'
    assert zeroshot.text_model_spec({'args': {'model': 'CLIP_TINY'}}, 'c.pt', 'SLIP_TINY').name == 'SLIP_TINY'
    assert zeroshot.text_model_spec({'args': {}}, 'c.pt', 'CLIP_SIMCLR_TINY').name == 'SLIP_TINY'  # legacy name


def test_text_model_spec_refuses_a_checkpoint_without_a_model_name():
    with pytest.raises(utils.CheckpointError, match=r"^checkpoint 'c\.pt' has no args\.model, so the architecture "
                                                    r"is unknown$"):
        zeroshot.text_model_spec({'args': {'model': ''}}, 'c.pt')
    with pytest.raises(utils.CheckpointError, match=r"^checkpoint 'c\.pt' has no args\.model: pass --model NAME$"):
        zeroshot.text_model_spec({'args': {}}, 'c.pt', no_name=': pass --model NAME')


def test_text_model_spec_refuses_simclr_with_the_callers_reason():
    with pytest.raises(ValueError, match=r"^checkpoint 'c\.pt' holds SIMCLR_TINY, a SimCLR model without a text "
                                         r"encoder: zero-shot evaluation needs a CLIP or SLIP checkpoint"):
        zeroshot.text_model_spec({'args': {'model': 'SIMCLR_TINY'}}, 'c.pt')
    with pytest.raises(ValueError, match=r"^checkpoint 'c\.pt' holds SIMCLR_TINY, no text here$"):
        zeroshot.text_model_spec({'args': {'model': 'SIMCLR_TINY'}}, 'c.pt', no_text='no text here')
    with pytest.raises(KeyError, match='NOT_A_MODEL'):
        zeroshot.text_model_spec({'args': {'model': 'NOT_A_MODEL'}}, 'c.pt')


def test_export_checks_its_checkpoint_with_the_librarys_model_check(monkeypatch):
    seen = []
    check = zeroshot.text_model_spec
    monkeypatch.setattr(zeroshot, 'text_model_spec', lambda *a, **k: seen.append((a, k)) or check(*a, **k))
    torch.manual_seed(0)
    ckpt = {'args': {'model': 'CLIP_TINY'}, 'state_dict': models.create_model('CLIP_TINY').state_dict()}
    _, spec = export_open_clip.build_model(ckpt, 'c.pt')
    assert spec.name == 'CLIP_TINY'
    assert [(a[1:], k['no_name']) for a, k in seen] == [(('c.pt', None), ': pass --model NAME')]
