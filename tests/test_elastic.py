"""Elastic restarts: a run written by 2 processes resumes in 1, and one written by 1 resumes in 2 (`torchrun`, CPU, gloo).

The run identity counts the training batches of all the processes together, so the restarted run is the same run:
`resume='latest'` (and a folder) continue it from its newest checkpoint taken at an epoch's end, passing over the ones
taken in an epoch by the other number of processes (their batch index counts another number of batches per process).
"""
import warnings
from pathlib import Path
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import test_distributed as td

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch build has no torch.distributed gloo backend")

N_ONE, N_TWO = 13, 7  # training batches per epoch: 200 items, batch size 16, in one process and in each of two

SETUP = '''
import os, sys, warnings, torch
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fastcb.core import Callback, CancelFitException
from fastcb.learner import Learner, DataLoaders
from fastcb.checkpoint import CheckpointCallback
from common import data, model

class Count(Callback):
    def before_fit(self): self.n = 0
    def after_batch(self): self.n += self.training

def mk(out, folder):
    x,y = data(200)
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3)),
                      DataLoader(TensorDataset(x[:48], y[:48]), batch_size=16), device='cpu')
    l = Learner(dls, model(), loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1, path=out,
                cbs=[CheckpointCallback(every_n_iters=3, path=folder), Count()])
    l.logger = lambda row: None
    return l

def stop_at(n):
    def f(self):
        if self.learn.training and self.learn.train_iter == n: raise CancelFitException()
    return Callback(after_batch=f)

def resumed(l, **kw):
    "Fit 3 epochs with `kw` (resume=...): (batches trained, train_iter, epochs in the history, warnings)"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        l.fit(3, **kw)
    return l.count.n, l.train_iter, len(l.recorder.values), [str(o.message) for o in w]
'''

JOB = SETUP + '''
import fastcb.distributed
out,rank = Path(sys.argv[1]),int(os.environ['RANK'])
R = {}
l = mk(out, 'one')  # 1 -> 2: the single-process run the test wrote, interrupted in its second epoch
with l.distrib_ctx(): R['from_one'] = resumed(l, resume='latest')
l = mk(out, 'two')  # 2 processes write, interrupted in their second epoch (after 4 of its 7 batches)
with l.distrib_ctx(): l.fit(3, cbs=stop_at(''' + str(N_TWO + 4) + '''))
R['two_files'] = sorted(p.name for p in (out/'two').glob('checkpoint_*.pth'))
torch.save(R, out/f'rank{rank}.pt')
'''


def _single(out, folder):
    "The job's setup in this process: its namespace, and a learner writing to `out/folder`"
    (out/'common.py').write_text(td.COMMON)
    g = {'__file__': str(out/'job.py')}
    exec(SETUP, g)
    return g, g['mk'](out, folder)


@pytest.mark.slow  # 10-12 s: three torchrun jobs
def test_elastic_restart(tmp_path):
    g, l = _single(tmp_path, 'one')
    l.fit(3, cbs=g['stop_at'](N_ONE + 5))  # one process, interrupted in its second epoch
    rc, output, secs = td.torchrun(JOB, tmp_path, timeout=240)
    assert rc == 0, output[-6000:]
    res = [torch.load(tmp_path/f'rank{r}.pt', weights_only=False) for r in range(2)]
    for r in res:  # 1 -> 2: from the end of epoch 1 (the newest checkpoint, in epoch 2, counts 13 batches per process)
        n, it, epochs, w = r['from_one']
        assert (n, it, epochs) == (2*N_TWO, 3*N_TWO, 3), (r['from_one'], output[-3000:])
        assert not any('data, batch size and drop_last' in m or 'other runs' in m for m in w), w
    names = res[0]['two_files']
    assert any('_epoch0_end' in n for n in names) and any('_epoch1_iter' in n for n in names), names
    # 2 -> 1, with 'latest' and with the folder: from the end of epoch 1, the counters in this process's batches
    import shutil
    shutil.copytree(tmp_path/'two', tmp_path/'two_copy')  # (each resume finishes the run in its folder)
    for folder, kw in (('two', dict(resume='latest')), ('x', dict(resume=tmp_path/'two_copy'))):
        g, l = _single(tmp_path, folder)
        n, it, epochs, w = g['resumed'](l, **kw)
        assert (n, it, epochs) == (2*N_ONE, 3*N_ONE, 3), (kw, n, it, epochs, w)
        assert any('another number of processes' in m for m in w), w
        assert not any('data, batch size and drop_last' in m or 'other runs' in m for m in w), w
    # the checkpoint taken in epoch 2 by 2 processes, by name: refused, saying why (not blaming the data)
    mid = next(f for f in sorted((tmp_path/'two_copy').glob('*_epoch1_iter*.pth')))
    g, l = _single(tmp_path, 'y')
    with pytest.raises(ValueError, match='resumes only with as many batches per process'): l.fit(3, resume=mid)
