"""The original SLIP's public calls keep working beside ours, because users' notebooks were written against them.

Models: ``model(image, text)`` (CLIP), ``model(aug1, aug2)`` (SimCLR) and ``model(image, text, aug1, aug2)`` (SLIP)
give exactly what ``model(augment.Batch(...))`` gives, under the original's output keys.
"""
import copy

import pytest
import torch

import augment
import models

TINY = ['CLIP_TINY', 'SIMCLR_TINY', 'SLIP_TINY']
# The original's forward arguments, in order, and its output keys, by family.
ORIGINAL_ARGS = {'clip': ('image', 'text'), 'simclr': ('aug1', 'aug2'), 'slip': ('image', 'text', 'aug1', 'aug2')}
ORIGINAL_KEYS = {'clip': {'image_embed', 'text_embed', 'logit_scale'}, 'simclr': {'aug1_embed', 'aug2_embed'},
                 'slip': {'image_embed', 'text_embed', 'logit_scale', 'aug1_embed', 'aug2_embed'}}


def _original_inputs(name, tokenizer, batch=4, seed=0):
    """What the original's loaders handed its models: ImageNet-normalised float views [B, 3, H, W], token ids [B, 77]."""
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
