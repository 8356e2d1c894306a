"""`EMA` and `SWA` under `Learner.distrib_ctx` with 2 real processes (`torchrun`, CPU, gloo): every process ends with the
same averages, equal to those of one process with the same global batch; under FSDP both refuse with a clear error."""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import pytest
from test_distributed import torchrun, COMMON, pytestmark  # noqa: F401  (the same skip when gloo is missing)

JOB = '''
import os, sys, torch
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fastcb.learner import Learner, DataLoaders
from fastcb.averaging import EMA, SWA
import fastcb.distributed, fastcb.fsdp  # distrib_ctx, and its 'fsdp' strategy
from common import data, model, acc
out,rank = Path(sys.argv[1]),int(os.environ['RANK'])
x,y = data(256)
dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16))
learn = Learner(dls, model(), loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1, metrics=acc,
                cbs=[EMA(0.9), SWA(swa_start=1, swa_lr=0.05, anneal_epochs=1)])
with learn.distrib_ctx(): learn.fit(3)
R = {'ema': {k: v.clone() for k,v in learn.ema.state_dict()['weights'].items()}, 'n_updates': learn.ema.n_updates,
     'weights': {k: v.clone() for k,v in learn.model.state_dict().items()}, 'values': learn.recorder.values,
     'lrs': learn.recorder.lrs, 'model': type(learn.model).__name__}
learn = Learner(dls, model(), loss_func=nn.CrossEntropyLoss(), cbs=EMA())
try:
    with learn.distrib_ctx(strategy='fsdp'): learn.fit(1)
except Exception as e: R['fsdp'] = str(e)
torch.save(R, out/f'rank{rank}.pt')
'''


def _single():
    "The one-process run with the global batch (2 x 16)"
    from fastcb.learner import Learner, DataLoaders
    from fastcb.averaging import EMA, SWA
    ns = {}
    exec(COMMON, ns)
    x, y = ns['data'](256)
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=32), DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16),
                      device='cpu')
    learn = Learner(dls, ns['model'](), loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1, metrics=ns['acc'],
                    cbs=[EMA(0.9), SWA(swa_start=1, swa_lr=0.05, anneal_epochs=1)])
    with learn.no_logging(): learn.fit(3)
    return learn


def test_ema_swa_same_on_every_process_and_as_one_process(tmp_path):
    rc, output, _ = torchrun(JOB, tmp_path)
    assert rc == 0, output[-6000:]
    res = [torch.load(tmp_path/f'rank{r}.pt', weights_only=False) for r in range(2)]
    for k in res[0]['ema']: assert torch.equal(res[0]['ema'][k], res[1]['ema'][k]), k
    for k in res[0]['weights']: assert torch.equal(res[0]['weights'][k], res[1]['weights'][k]), k
    learn = _single()
    ema, w = learn.ema.state_dict()['weights'], learn.model.state_dict()
    for r in res:
        assert r['model'] == 'Sequential' and r['n_updates'] == learn.ema.n_updates == 24
        for k, v in ema.items(): torch.testing.assert_close(r['ema'][k], v, atol=1e-5, rtol=0)
        for k, v in w.items(): torch.testing.assert_close(r['weights'][k], v, atol=1e-5, rtol=0)  # the SWA average
        # validated with the EMA weights, exactly over the shards; the SWALR learning rates
        torch.testing.assert_close(torch.tensor(r['values']), torch.tensor(learn.recorder.values), atol=1e-5, rtol=0)
        assert r['lrs'] == pytest.approx(learn.recorder.lrs)
    assert learn.swa.n_averaged == 2
    for r in res: assert 'EMA does not support FSDP' in r.get('fsdp', ''), r.get('fsdp')
