#!/usr/bin/env python
"""Function calls (Python and C, as `sys.setprofile` counts them) per training and validation batch, over a hand-written
loop on the same tiny MLP and batches: fastcb with its default callbacks, and pytorch-ignite's `Engine` with the step
`create_supervised_trainer` runs, when ignite is importable. Counts, not times: the same on every machine.
`tests/test_hot_path.py` holds fastcb to its budget with the same method.

    python bench/call_counts.py
"""
import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))
import torch
from torch import nn
import test_hot_path as hp

def _ignite(n, train):
    "ignite's Engine with the step of `create_supervised_trainer` (train: model.train, backward, step, `loss.item()`)"
    from ignite.engine import Engine
    model,lf,dl = hp._model(),nn.CrossEntropyLoss(),hp._dls(n).train
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    def train_step(engine, b):
        model.train(); opt.zero_grad()
        xb,yb = b
        loss = lf(model(xb), yb); loss.backward(); opt.step()
        return loss.item()
    def eval_step(engine, b):
        model.eval()
        with torch.no_grad(): xb,yb = b; return lf(model(xb), yb)
    e = Engine(train_step if train else eval_step)
    return hp._count(lambda: e.run(dl, max_epochs=1))

if __name__ == '__main__':
    try: import ignite; peers = {'ignite': _ignite}
    except ImportError: peers = {}; print('(pytorch-ignite not importable: its column is skipped)')
    print(f"{'phase':<8}{'raw loop':>10}{'fastcb extra':>14}" + ''.join(f'{n + " extra":>14}' for n in peers))
    for train in (True, False):
        raw,_ = hp._per_batch(hp._raw, train=train)
        fc,_ = hp._per_batch(hp._fastcb, train=train)
        others = [hp._per_batch(f, train=train)[0] - raw for f in peers.values()]
        print(f"{'train' if train else 'valid':<8}{raw:>10.0f}{fc - raw:>14.0f}" + ''.join(f'{o:>14.0f}' for o in others))
