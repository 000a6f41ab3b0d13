"""The original SLIP's public calls keep working beside ours, because users' notebooks were written against them.

Models: ``model(image, text)`` (CLIP), ``model(aug1, aug2)`` (SimCLR) and ``model(image, text, aug1, aug2)`` (SLIP)
give exactly what ``model(augment.Batch(...))`` gives, under the original's output keys.
Losses: ``models.get_loss(name, ssl_temp, ssl_scale)`` (the original's call and place) returns CLIPLoss /
SIMCLRLoss / SLIPLoss, whose value on those outputs is the one our training step computes.
Data: ``datasets.get_dataset(train_transform, tokenizer, args)`` gives our samples as the original's tuples, and
``datasets.get_downstream_dataset(catalog, name, is_train, transform)`` reads the catalog's sets (here the demo).
"""
import argparse
import copy
import json
import pathlib

import pytest
import torch
import torchvision.transforms as T

import augment
import datasets
import losses
import models

REPO = pathlib.Path(__file__).resolve().parent.parent

TINY = ['CLIP_TINY', 'SIMCLR_TINY', 'SLIP_TINY']
# The original's forward arguments, in order, and its output keys, by family.
ORIGINAL_ARGS = {'clip': ('image', 'text'), 'simclr': ('aug1', 'aug2'), 'slip': ('image', 'text', 'aug1', 'aug2')}
ORIGINAL_KEYS = {'clip': {'image_embed', 'text_embed', 'logit_scale'}, 'simclr': {'aug1_embed', 'aug2_embed'},
                 'slip': {'image_embed', 'text_embed', 'logit_scale', 'aug1_embed', 'aug2_embed'}}
# The original's loss class and metric keys (its get_metric_names), by family.
ORIGINAL_LOSSES = {'clip': (losses.CLIPLoss, {'loss', 'clip_loss', 'clip_acc'}),
                   'simclr': (losses.SIMCLRLoss, {'loss', 'ssl_loss', 'ssl_acc'}),
                   'slip': (losses.SLIPLoss, {'loss', 'clip_loss', 'ssl_loss', 'clip_acc', 'ssl_acc'})}


def _original_inputs(name, tokenizer, batch=4, seed=0):
    """What the original's loaders gave its models: ImageNet-normalised float views [B, 3, H, W], token ids [B, 77]."""
    g = torch.Generator().manual_seed(seed)
    size = models.get_spec(name).image_size
    views = {k: torch.randn(batch, 3, size, size, generator=g) for k in ('image', 'aug1', 'aug2')}
    text = tokenizer(['a dog', 'a red circle on a grey background', 'hello', 'x y z w v'][:batch])
    fields = ORIGINAL_ARGS[models.get_spec(name).family]
    return {k: text if k == 'text' else views[k] for k in fields}


def _twins(name):
    """Two copies of one seeded model in training mode (BatchNorm uses batch statistics and updates its own)."""
    torch.manual_seed(0)
    model = models.create_model(name).train()
    return model, copy.deepcopy(model)


@pytest.mark.parametrize('name', TINY)
def test_original_positional_call_equals_batch_call(name, tokenizer):
    inputs = _original_inputs(name, tokenizer)
    ours, theirs = _twins(name)
    out = ours(augment.Batch(**inputs))
    out_original = theirs(*inputs.values())  # model(image, text) / model(aug1, aug2) / model(image, text, aug1, aug2)
    assert set(out_original) == set(out) == ORIGINAL_KEYS[models.get_spec(name).family]
    for k in out:
        assert torch.equal(out_original[k], out[k]), k  # the same computation: bitwise equal
    for (k, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
        assert torch.equal(a, b), k  # BatchNorm running statistics updated alike


@pytest.mark.parametrize('name', TINY)
def test_original_keyword_call_equals_batch_call(name, tokenizer):
    inputs = _original_inputs(name, tokenizer)
    model = models.create_model(name).eval()
    with torch.no_grad():
        out, out_original = model(augment.Batch(**inputs)), model(**inputs)  # e.g. model(image=..., text=...)
    for k in out:
        assert torch.equal(out_original[k], out[k]), k


def test_forward_refuses_a_batch_with_tensors_or_missing_tensors(tokenizer):
    inputs = _original_inputs('SLIP_TINY', tokenizer)
    model = models.create_model('SLIP_TINY').eval()
    with pytest.raises(TypeError, match='not both'):
        model(augment.Batch(**inputs), inputs['text'])
    with pytest.raises(TypeError, match='missing aug1, aug2'):
        model(inputs['image'], inputs['text'])
    with pytest.raises(TypeError, match='missing aug2'):
        models.create_model('SIMCLR_TINY')(inputs['aug1'])


@pytest.mark.parametrize('name', TINY)
def test_original_get_loss_on_original_outputs_equals_our_step(name, tokenizer):
    """The original's ``models.get_loss(name, ssl_temp, ssl_scale)(model(image, text, ...))`` against our
    ``model(batch)`` and the criterion built by hand from the loss classes, with non-default temperature and scale."""
    family = models.get_spec(name).family
    inputs = _original_inputs(name, tokenizer)
    ours, theirs = _twins(name)
    criterion = models.get_loss(name, 0.2, 0.5)  # positional, as the original's main.py called it
    loss_class, metric_keys = ORIGINAL_LOSSES[family]
    assert type(criterion) is loss_class
    ours_criterion = {'clip': lambda: losses.CLIPLoss(), 'simclr': lambda: losses.SIMCLRLoss(temperature=0.2),
                      'slip': lambda: losses.SLIPLoss(losses.SIMCLRLoss(temperature=0.2), ssl_scale=0.5)}[family]()
    result = criterion(theirs(*inputs.values()))
    expected = ours_criterion(ours(augment.Batch(**inputs)))
    assert set(result) == set(expected) == metric_keys
    for k in expected:
        assert torch.equal(result[k], expected[k]), k  # same outputs, same loss: bitwise equal
    result['loss'].backward()
    expected['loss'].backward()
    for (k, a), (_, b) in zip(theirs.named_parameters(), ours.named_parameters()):
        assert torch.equal(a.grad, b.grad), k


# ----------------------------------------------------------------------------------------------------------------
# Data: datasets.get_dataset(train_transform, tokenizer, args) and datasets.get_downstream_dataset(catalog, ...)
# ----------------------------------------------------------------------------------------------------------------
def _demo_args(name, **extra):
    return argparse.Namespace(dataset='demo', root='', metadata='', model=name, seed=0, demo_samples=8, **extra)


@pytest.mark.parametrize('name', TINY)
def test_original_get_dataset_gives_our_samples_as_the_original_tuples(name, tokenizer):
    family, size = models.get_spec(name).family, models.get_spec(name).image_size
    train_transform = augment.build_transforms(size)[0]  # the CLIP view, as the original's main.py built it
    original = datasets.get_dataset(train_transform, tokenizer, _demo_args(name))
    ours = datasets.get_train_dataset(_demo_args(name), tokenizer)
    assert len(original) == len(ours) == 8
    for epoch in (0, 1):
        original.set_epoch(epoch)
        ours.set_epoch(epoch)
        for i in (0, 5):
            sample, expected = original[i], ours[i]
            assert isinstance(sample, tuple) and len(sample) == len(ORIGINAL_ARGS[family])
            for field, x in zip(ORIGINAL_ARGS[family], sample):
                assert torch.equal(x, getattr(expected, field)), (epoch, i, field)


def test_original_training_step_runs_on_original_samples(tokenizer):
    """The original's loop: default collate of tuple samples, ``model(*inputs)``, ``get_loss(...)(outputs)``."""
    name = 'SLIP_TINY'
    dataset = datasets.get_dataset(augment.build_transforms(64)[0], tokenizer, _demo_args(name))
    inputs = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    torch.manual_seed(0)
    model = models.create_model(name)
    loss = models.get_loss(name, 0.1, 1.0)(model(*inputs))
    loss['loss'].backward()
    assert torch.isfinite(loss['loss']) and set(loss) == ORIGINAL_LOSSES['slip'][1]


@pytest.mark.parametrize('is_train', [False, True])
def test_original_get_downstream_dataset_reads_the_demo_set(is_train):
    """The original's zero-shot loop: catalog entry, ``get_downstream_dataset(catalog, name, is_train, transform)``
    with its validation transform, a DataLoader, labels.json's class names."""
    catalog = json.loads((REPO / 'dataset_catalog.json').read_text())
    catalog['demo']['size'] = 16
    classes = json.loads((REPO / 'labels.json').read_text())['demo']
    val_transform = T.Compose([T.Resize(64), T.CenterCrop(64), T.ToTensor(), T.Normalize(augment.IMAGENET_MEAN,
                                                                                         augment.IMAGENET_STD)])
    dataset = datasets.get_downstream_dataset(catalog, 'demo', is_train, val_transform)
    assert len(dataset) == 16
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=16)))
    assert images.shape == (16, 3, 64, 64) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= int(labels.min()) and int(labels.max()) < len(classes)
    split = 'train' if is_train else 'test'
    assert torch.equal(images[3], val_transform(datasets.demo_sample(3, split)[0]))  # the demo images, in order
