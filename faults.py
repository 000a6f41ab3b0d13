"""Fault injection (``--inject-fault``): rehearse the divergence guard and the checkpoint writer on a real run.

``--inject-fault`` takes a comma-separated list of ``KIND@STEP[:N]``, STEP a global optimizer step counted from 0
(epoch x steps-per-epoch + step in the epoch, as the warnings print it):

    loss-spike@STEP[:N]     the loss of N steps from STEP is multiplied by SPIKE_FACTOR, backward included (a real
                            spike); N defaults to --guard-patience, just enough to make a divergence
    nan@STEP[:N]            the loss of N steps from STEP is NaN; N defaults to --max-nonfinite
    kill-during-save@STEP   SIGKILL of the whole process while the checkpoint taken after STEP is being written, once
                            part of its temporary file is on disk

It is refused unless ``--allow-fault-injection`` is given too (a flag no real run carries by accident), and a resume
whose ``--inject-fault`` differs from the checkpoint's (or from a checkpoint that does not record one) is refused
unless ``--resume-override``. Each fault fires at most once per output directory: fired faults are listed in
``<output-dir>/injected_faults.json``, so the rerun after an injected kill does not kill itself again.
"""
import argparse
import json
import os
import re
from typing import List, NamedTuple, Optional

import torch
import torch.nn as nn

import utils
from utils import logger

KINDS = ('loss-spike', 'nan', 'kill-during-save')
SPIKE_FACTOR = 100.0
FIRED_FILE = 'injected_faults.json'
_SPEC = re.compile(r'^(?P<kind>[a-z-]+)@(?P<step>\d+)(?::(?P<n>\d+))?$')


def add_args(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a('--inject-fault', default=None, metavar='SPEC',
      help='rehearse recovery: comma-separated loss-spike@STEP[:N], nan@STEP[:N], kill-during-save@STEP (global '
           'optimizer steps from 0; see faults.py); needs --allow-fault-injection')
    a('--allow-fault-injection', action='store_true', help='confirm that --inject-fault is meant')


class Fault(NamedTuple):
    kind: str
    step: int
    count: int

    def __str__(self) -> str:
        return f'{self.kind}@{self.step}' + (f':{self.count}' if self.kind != 'kill-during-save' else '')


def parse(spec: str, patience: int, max_nonfinite: int) -> List[Fault]:
    """The faults of an --inject-fault SPEC. Raises ValueError naming the flag and the bad item."""
    faults = []
    for item in filter(None, (x.strip() for x in spec.split(','))):
        m = _SPEC.match(item)
        if m is None or m['kind'] not in KINDS or (m['kind'] == 'kill-during-save' and m['n']):
            raise ValueError(f'--inject-fault: cannot read {item!r}; expected loss-spike@STEP[:N], nan@STEP[:N] or '
                             f'kill-during-save@STEP')
        default = {'loss-spike': patience, 'nan': max_nonfinite}.get(m['kind'], 1)
        count = int(m['n']) if m['n'] else default
        if count < 1:
            raise ValueError(f'--inject-fault: {item!r} covers no step')
        faults.append(Fault(m['kind'], int(m['step']), count))
    return faults


def check_args(args: argparse.Namespace, errors: List[str]) -> None:
    """Append to ``errors`` when --inject-fault is unreadable or lacks --allow-fault-injection."""
    if not args.inject_fault:
        return
    if not args.allow_fault_injection:
        errors.append(f'--inject-fault {args.inject_fault!r} damages the run on purpose: add --allow-fault-injection '
                      f'to confirm (never on a real run)')
    try:
        parse(args.inject_fault, args.guard_patience, args.max_nonfinite)
    except ValueError as e:
        errors.append(str(e))


def check_resume(stored: dict, args: argparse.Namespace, path: str) -> None:
    """Refuse to inject faults into a run whose checkpoint does not record the same --inject-fault (the field
    comparison of main.RESUME_FIELDS covers the other cases; this one covers checkpoints that predate the flag)."""
    if args.inject_fault and 'inject_fault' not in stored and not args.resume_override:
        raise SystemExit(f'refusing to resume from {path} with --inject-fault {args.inject_fault!r}: the checkpoint '
                         f'does not record fault injection; use a new --output-dir (or --resume-override)')


class FaultPlan:
    """The faults still to fire in ``output_dir``, read from --inject-fault and the record of those that fired."""

    def __init__(self, spec: str, output_dir: str, patience: int, max_nonfinite: int):
        self.path = os.path.join(output_dir, FIRED_FILE)
        fired = set(json.load(open(self.path))) if os.path.isfile(self.path) else set()
        self.faults = [f for f in parse(spec, patience, max_nonfinite) if str(f) not in fired]
        self.fired = fired
        if fired:
            logger.info('fault injection: %s already fired in %s, not again', ', '.join(sorted(fired)), output_dir)

    def _fire(self, fault: Fault) -> None:
        if str(fault) in self.fired:
            return
        self.fired.add(str(fault))
        logger.warning('fault injection: %s fires', fault)
        if utils.is_main_process():
            with open(self.path, 'w') as f:  # before the fault acts: a kill must find it recorded
                json.dump(sorted(self.fired), f)
                f.flush()
                os.fsync(f.fileno())

    def loss_factor(self, step: Optional[int]) -> Optional[float]:
        """What global step ``step``'s loss is multiplied by, or None."""
        for f in self.faults:
            if f.kind != 'kill-during-save' and step is not None and f.step <= step < f.step + f.count:
                self._fire(f)
                return SPIKE_FACTOR if f.kind == 'loss-spike' else float('nan')
        return None

    def kill_during_save(self, step: int) -> bool:
        """Whether the checkpoint taken after global step ``step`` is to be killed while it is written."""
        for f in self.faults:
            if f.kind == 'kill-during-save' and f.step == step and str(f) not in self.fired:
                self._fire(f)
                return True
        return False


class FaultyLoss(nn.Module):
    """The engine's criterion with the plan's factor applied to the loss of the engine's current step.

    The factor is a 0-dim tensor set before each step (``set_step``, the engine's ``before_step``), outside the
    forward: 1 (which changes no bit) unless a fault fires on that step. A compiled step (--compile) reads it as an
    input of its graph, so the plan's bookkeeping (its log line, its record of fired faults) stays out of the graph.
    """

    def __init__(self, criterion: nn.Module, plan: FaultPlan, device: torch.device):
        super().__init__()
        self.criterion, self.plan = criterion, plan
        self.factor = torch.ones((), device=device)

    def set_step(self, step: Optional[int]) -> None:
        factor = self.plan.loss_factor(step)
        self.factor.fill_(1.0 if factor is None else factor)

    def forward(self, outputs):
        out = self.criterion(outputs)
        return {**out, 'loss': out['loss'] * self.factor}


def install(engine, args: argparse.Namespace) -> Optional[FaultPlan]:
    """Read --inject-fault and wrap the engine's criterion; None without faults."""
    if not args.inject_fault:
        return None
    plan = FaultPlan(args.inject_fault, args.output_dir, args.guard_patience, args.max_nonfinite)
    engine.criterion = FaultyLoss(engine.criterion, plan, engine.device)
    engine.before_step = engine.criterion.set_step
    logger.warning('fault injection on: %s', ', '.join(map(str, plan.faults)) or 'every fault already fired')
    return plan
