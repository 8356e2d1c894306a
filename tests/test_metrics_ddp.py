"""fastai's metrics under `Learner.distrib_ctx` with 2 real processes (`torchrun`, gloo on the CPU): each gives the value
of one process on the whole data, in training (`Recorder(train_metrics=True)`) and in validation, although the
processes see different shards (and a validation set that does not split evenly)."""
import math, warnings
import pytest
import torch
from test_distributed import torchrun, COMMON

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch build has no torch.distributed gloo backend")
pytest.importorskip('sklearn')

SETUP = '''
import torch
from functools import partial
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fastcb.learner import Learner, DataLoaders
from fastcb.metrics import *

class CEParts(nn.Module):
    "Cross-entropy plus a Brier term, each kept as an attribute (what LossMetrics reads)"
    def forward(self, p, t):
        self.ce = nn.functional.cross_entropy(p, t)
        self.sq = (p.softmax(-1) - nn.functional.one_hot(t, 3)).pow(2).sum(-1).mean()
        return self.ce + self.sq

def med(p, t): return (p.float() - t.float()).abs().quantile(0.5)  # needs every prediction at once

def mk(bs):
    "One epoch of SGD on 256 items, validation on 50 (batches of 16), with fastai's metrics on both phases"
    x,y = data(256)
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=bs), DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16),
                      device='cpu')
    mets = [partial(top_k_accuracy, k=2), Perplexity(), AccumMetric(med, dim_argmax=-1), RocAuc(), *LossMetrics('ce,sq'),
            AccumMetric(lambda p, t: float(len(p)), dim_argmax=-1, name='n_items')]
    learn = Learner(dls, model(), loss_func=CEParts(), opt_func=torch.optim.SGD, lr=0.1, metrics=mets)
    learn.recorder.train_metrics = True
    return learn
'''

JOB = '''
import os, sys, warnings, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pathlib import Path
import fastcb.distributed
from common import data, model
''' + SETUP + '''
out,rank = Path(sys.argv[1]),int(os.environ['RANK'])
learn = mk(16)
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter('always')
    with learn.distrib_ctx(): learn.fit(1)
torch.save({'names': learn.recorder.metric_names, 'values': learn.recorder.values,
            'warnings': [str(w.message) for w in ws]}, out/f'rank{rank}.pt')
'''


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    "The recorded values of each process of the 2-process job, and of one process with batches twice as large"
    folder = tmp_path_factory.mktemp('metrics_ddp')
    rc, output, _ = torchrun(JOB, folder)
    assert rc == 0, output[-6000:]
    ns = {}
    exec(COMMON, ns); exec(SETUP, ns)
    learn = ns['mk'](32)
    learn.fit(1)
    return [torch.load(folder/f'rank{r}.pt', weights_only=False) for r in range(2)], learn.recorder


def test_metrics_exact_across_processes(results):
    ddp, rec = results
    names = rec.metric_names
    assert names[1:-1] == ['train_loss', 'train_top_k_accuracy', 'train_perplexity', 'train_med', 'train_roc_auc_score',
                           'train_ce', 'train_sq', 'train_n_items', 'valid_loss', 'valid_top_k_accuracy', 'valid_perplexity',
                           'valid_med', 'valid_roc_auc_score', 'valid_ce', 'valid_sq', 'valid_n_items']
    one = rec.values[0]
    for r in ddp:
        assert r['names'] == names
        for n, a, b in zip(names[1:], r['values'][0], one): assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (n, a, b)
    # every process kept every item once: 256 training items, the 50 validation items (the shards are 25 and 25, padded)
    assert one[names.index('train_n_items') - 1] == 256 and one[names.index('valid_n_items') - 1] == 50


def test_no_warning_for_accum_metric_in_training(results):
    "An AccumMetric gathers every process's batches itself (`gathers_batches`): the strategy neither sums it nor warns"
    ddp, _ = results
    assert not [w for w in ddp[0]['warnings'] if 'med' in w or 'roc_auc' in w or 'n_items' in w], ddp[0]['warnings']
