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

Rank and world size are arguments of each loss (``rank=None`` / ``world_size=None``: the process group's, or 0 and 1
without one, read at each call). One process can play rank ``r`` of ``W``: ``loss(local_outputs,
gathered=global_outputs)`` with ``rank=r, world_size=W`` takes the global batch's columns from ``gathered`` (the
outputs of all ``W`` ranks concatenated in rank order) instead of an all-gather, this rank's slice replaced by the
local features so that the gradient reaches them as through the real gather (``tests/test_losses.py``).

A model's loss by its name: ``models.get_loss(name, ssl_temp, ssl_scale)`` (where the original had it), which reads
the family from the registry and calls ``loss_for_family``.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils


def _full(x: torch.Tensor) -> torch.Tensor:
    """Half-precision embeddings are upcast: the loss is cheap and gathers behave the same on every backend."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _placement(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    """(rank, world size): the given ones, else the process group's (0 and 1 without one)."""
    rank = utils.get_rank() if rank is None else rank
    world_size = utils.get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f'rank must be in [0, world_size), got rank {rank} of world size {world_size}')
    return rank, world_size


def _local_labels(n: int, rank: int, device: torch.device) -> torch.Tensor:
    """Indices of this rank's samples inside the batch gathered over all ranks."""
    return torch.arange(n, device=device) + n * rank


def gather_features(local: Sequence[torch.Tensor], rank: int, world_size: int, with_grad: bool = True,
                    gathered: Optional[Sequence[torch.Tensor]] = None) -> List[torch.Tensor]:
    """Each of this rank's normalised features [n, D] concatenated over the ``world_size`` ranks: [world_size*n, D],
    this rank's slice at rows ``rank*n`` to ``(rank+1)*n``.

    ``gathered`` None: an all-gather over the process group (the local tensors themselves at world size 1); with
    gradient, the gradient that every rank's loss sends to this rank's slice reaches the local features
    (``utils.GatherLayer``); without (the original CLIP gather), nothing gathered carries one, own slice included.
    ``gathered`` given: the global features, normalised by the caller, as one process playing this rank would have
    received them; this rank's slice is replaced by ``local``, so that the gradient behaves as above.
    """
    if gathered is None:
        if world_size == 1:
            return list(local)
        if utils.get_world_size() != world_size:
            raise ValueError(f'world size {world_size} without a process group of that size '
                             f'(it has {utils.get_world_size()}): pass gathered= to play a rank in one process')
        return utils.all_gather_batch_with_grad(local) if with_grad else utils.all_gather_batch(local)
    out = []
    for mine, whole in zip(local, gathered, strict=True):
        n = mine.shape[0]
        if whole.shape != (world_size * n, *mine.shape[1:]):
            raise ValueError(f'gathered features of shape {tuple(whole.shape)}: expected world size x local batch '
                             f'({world_size} x {n}) rows of {tuple(mine.shape[1:])}')
        whole = torch.cat([whole[:rank * n], mine, whole[(rank + 1) * n:]])
        out.append(whole if with_grad else whole.detach())
    return out


def _normalized(outputs: Dict[str, torch.Tensor], keys: Sequence[str]) -> List[torch.Tensor]:
    return [F.normalize(_full(outputs[k]), dim=-1) for k in keys]


class CLIPLoss(nn.Module):
    """Symmetric InfoNCE between images and captions, with the learned (exponentiated) logit scale.

    gather_with_grad: False for the original's no-gradient gather (``--legacy-clip-gather``).
    rank, world_size: this process's place (None: the process group's).
    """

    def __init__(self, gather_with_grad: bool = True, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        self.gather_with_grad = gather_with_grad
        self.rank, self.world_size = rank, world_size

    def forward(self, outputs: Dict[str, torch.Tensor],
                gathered: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """``gathered``: the global batch's outputs, to play a rank in one process (module docstring)."""
        rank, world_size = _placement(self.rank, self.world_size)
        keys = ('image_embed', 'text_embed')
        image, text = _normalized(outputs, keys)  # [n, E] each
        scale = _full(outputs['logit_scale'])
        labels = _local_labels(image.shape[0], rank, image.device)
        image_all, text_all = gather_features([image, text], rank, world_size, self.gather_with_grad,
                                              None if gathered is None else _normalized(gathered, keys))  # [N, E]
        logits_per_image = scale * image @ text_all.t()  # [n, N]
        logits_per_text = scale * text @ image_all.t()  # [n, N]
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        with torch.no_grad():
            acc = (logits_per_image.argmax(dim=-1) == labels).float().mean() * 100
        return {'loss': loss, 'clip_loss': loss.detach(), 'clip_acc': acc}


class SIMCLRLoss(nn.Module):
    """NT-Xent over two views, with the same-view self-similarity masked out (VISSL layout, as the original).

    rank, world_size: this process's place (None: the process group's).
    """

    def __init__(self, temperature: float = 0.1, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        self.tau = temperature
        self.rank, self.world_size = rank, world_size

    def forward(self, outputs: Dict[str, torch.Tensor],
                gathered: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """``gathered``: the global batch's outputs, to play a rank in one process (module docstring)."""
        rank, world_size = _placement(self.rank, self.world_size)
        keys = ('aug1_embed', 'aug2_embed')
        q_a, q_b = _normalized(outputs, keys)  # [n, D] each
        k_a, k_b = gather_features([q_a, q_b], rank, world_size, True,
                                   None if gathered is None else _normalized(gathered, keys))  # [N, D] each
        labels = _local_labels(q_a.shape[0], rank, q_a.device)
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
    """CLIP's loss plus ``ssl_scale`` times ``ssl_loss`` (a SIMCLRLoss). rank, world_size: of the CLIP part (None:
    the process group's); the SSL loss keeps its own (``loss_for_family`` gives both the same)."""

    def __init__(self, ssl_loss: nn.Module, ssl_scale: float, gather_with_grad: bool = True,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        self.clip_loss = CLIPLoss(gather_with_grad, rank, world_size)
        self.ssl_loss = ssl_loss
        self.ssl_scale = ssl_scale

    def forward(self, outputs: Dict[str, torch.Tensor],
                gathered: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """``gathered``: the global batch's outputs, to play a rank in one process (module docstring)."""
        clip = self.clip_loss(outputs, gathered=gathered)
        ssl = self.ssl_loss(outputs, gathered=gathered)
        return {'loss': clip['loss'] + self.ssl_scale * ssl['loss'],
                'clip_loss': clip['clip_loss'], 'clip_acc': clip['clip_acc'],
                'ssl_loss': ssl['ssl_loss'], 'ssl_acc': ssl['ssl_acc']}


def loss_for_family(family: str, ssl_temp: float = 0.1, ssl_scale: float = 1.0, legacy_clip_gather: bool = False,
                    rank: Optional[int] = None, world_size: Optional[int] = None) -> nn.Module:
    """The loss of a model family ('clip', 'simclr' or 'slip'). By model name: ``models.get_loss``, which reads the
    family from the registry (this module does not import ``models``: the models import it). rank, world_size:
    this process's place (None: the process group's)."""
    if family not in ('clip', 'simclr', 'slip'):
        raise ValueError(f'unknown model family {family!r}: expected clip, simclr or slip')
    if family == 'clip':
        return CLIPLoss(not legacy_clip_gather, rank, world_size)
    if family == 'simclr':
        return SIMCLRLoss(ssl_temp, rank, world_size)
    return SLIPLoss(SIMCLRLoss(ssl_temp, rank, world_size), ssl_scale, not legacy_clip_gather, rank, world_size)
