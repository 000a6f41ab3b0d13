"""Contrastive losses of CLIP, SimCLR and SLIP.

The model-to-loss contract, used by every training loop and written to ``log.txt`` as ``train_<key>``:
  * input: the model's output dict -- ``image_embed`` [B, E], ``text_embed`` [B, E], ``logit_scale`` (already
    exponentiated) for CLIP; ``aug1_embed`` / ``aug2_embed`` [B, D] for SimCLR; all five for SLIP;
  * output: ``loss`` (the only tensor to back-propagate) plus detached metrics ``clip_loss``, ``clip_acc`` (CLIP),
    ``ssl_loss``, ``ssl_acc`` (SimCLR); SLIP returns all of them with ``loss = clip_loss + ssl_scale * ssl_loss``.

Across processes the logits are local rows x global columns. Features are gathered *with* gradient, so after DDP's
averaging every rank holds exactly the gradient of the full-batch loss. The original CLIP loss gathered without
gradient, dropping each sample's contribution as a column on other ranks (SLIP issue #31); ``CLIPLoss(
gather_with_grad=False)`` (``--legacy-clip-gather``) keeps that behaviour for exact reproduction.

A model's loss by its name: ``models.get_loss(name, ssl_temp, ssl_scale)`` (where the original had it), which reads
the family from the registry and calls ``loss_for_family``.
"""
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils


def _full(x: torch.Tensor) -> torch.Tensor:
    """Half-precision embeddings are upcast: the loss is cheap and gathers behave the same on every backend."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _local_labels(n: int, device: torch.device) -> torch.Tensor:
    """Indices of this rank's samples inside the batch gathered over all ranks."""
    return torch.arange(n, device=device) + n * utils.get_rank()


class CLIPLoss(nn.Module):
    def __init__(self, gather_with_grad: bool = True):
        super().__init__()
        self.gather_with_grad = gather_with_grad

    def forward(self, outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        image = F.normalize(_full(outputs['image_embed']), dim=-1)  # [n, E]
        text = F.normalize(_full(outputs['text_embed']), dim=-1)  # [n, E]
        scale = _full(outputs['logit_scale'])
        labels = _local_labels(image.shape[0], image.device)
        gather = utils.all_gather_batch_with_grad if self.gather_with_grad else utils.all_gather_batch
        image_all, text_all = gather([image, text])  # [N, E] each
        logits_per_image = scale * image @ text_all.t()  # [n, N]
        logits_per_text = scale * text @ image_all.t()  # [n, N]
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        with torch.no_grad():
            acc = (logits_per_image.argmax(dim=-1) == labels).float().mean() * 100
        return {'loss': loss, 'clip_loss': loss.detach(), 'clip_acc': acc}


class SIMCLRLoss(nn.Module):
    """NT-Xent over two views, with the same-view self-similarity masked out (VISSL layout, as the original)."""

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        self.tau = temperature

    def forward(self, outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        q_a = F.normalize(_full(outputs['aug1_embed']), dim=-1)  # [n, D]
        q_b = F.normalize(_full(outputs['aug2_embed']), dim=-1)  # [n, D]
        k_a, k_b = utils.all_gather_batch_with_grad([q_a, q_b])  # [N, D] each
        labels = _local_labels(q_a.shape[0], q_a.device)
        self_mask = F.one_hot(labels, k_a.shape[0]).bool()  # [n, N]: the sample itself in the same view
        logits_aa, logits_bb = q_a @ k_a.t() / self.tau, q_b @ k_b.t() / self.tau
        # the original's -1e9 (exp gives 0 either way), held within fp16's range under fp16 autocast
        masked = max(-1e9, torch.finfo(logits_aa.dtype).min)
        logits_aa, logits_bb = logits_aa.masked_fill(self_mask, masked), logits_bb.masked_fill(self_mask, masked)
        logits_ab = q_a @ k_b.t() / self.tau
        logits_ba = q_b @ k_a.t() / self.tau
        logits_a = torch.cat([logits_ab, logits_aa], dim=1)  # [n, 2N]; positive in the first block
        logits_b = torch.cat([logits_ba, logits_bb], dim=1)
        loss = (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2
        with torch.no_grad():
            acc = (logits_a.argmax(dim=-1) == labels).float().mean() * 100
        return {'loss': loss, 'ssl_loss': loss.detach(), 'ssl_acc': acc}


class SLIPLoss(nn.Module):
    def __init__(self, ssl_loss: nn.Module, ssl_scale: float, gather_with_grad: bool = True):
        super().__init__()
        self.clip_loss = CLIPLoss(gather_with_grad)
        self.ssl_loss = ssl_loss
        self.ssl_scale = ssl_scale

    def forward(self, outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        clip = self.clip_loss(outputs)
        ssl = self.ssl_loss(outputs)
        return {'loss': clip['loss'] + self.ssl_scale * ssl['loss'],
                'clip_loss': clip['clip_loss'], 'clip_acc': clip['clip_acc'],
                'ssl_loss': ssl['ssl_loss'], 'ssl_acc': ssl['ssl_acc']}


def loss_for_family(family: str, ssl_temp: float = 0.1, ssl_scale: float = 1.0,
                    legacy_clip_gather: bool = False) -> nn.Module:
    """The loss of a model family ('clip', 'simclr' or 'slip'). By model name: ``models.get_loss``, which reads the
    family from the registry (this module does not import ``models``: the models import it)."""
    if family not in ('clip', 'simclr', 'slip'):
        raise ValueError(f'unknown model family {family!r}: expected clip, simclr or slip')
    if family == 'clip':
        return CLIPLoss(gather_with_grad=not legacy_clip_gather)
    if family == 'simclr':
        return SIMCLRLoss(temperature=ssl_temp)
    return SLIPLoss(SIMCLRLoss(temperature=ssl_temp), ssl_scale, gather_with_grad=not legacy_clip_gather)
