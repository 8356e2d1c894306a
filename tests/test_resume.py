"""Exact resume across processes: a training killed with SIGKILL in the middle of an epoch and resumed from the latest
checkpoint in a new process ends with bit-identical weights, `recorder.losses` and `recorder.values` (CPU)."""
import os, random, signal, subprocess, sys, textwrap
from pathlib import Path
import pytest
import torch

TIMEOUT = 120  # seconds per process
LIMIT = 4*TIMEOUT  # seconds per test


SCRIPT = textwrap.dedent('''
    import os, random, signal, sys
    import numpy as np, torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from fastcb.core import *
    from fastcb.learner import *
    from fastcb.checkpoint import CheckpointCallback
    torch.set_num_threads(1)
    mode,out,folder,kill_at,seed = sys.argv[1],sys.argv[2],sys.argv[3],int(sys.argv[4]),int(sys.argv[5])

    def accuracy(pred, targ): return (pred.argmax(-1) == targ).float().mean()
    g = torch.Generator().manual_seed(0)                    # the data is always the same
    x = torch.randn(340, 10, generator=g); y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    dls = DataLoaders(DataLoader(TensorDataset(x[:300], y[:300]), batch_size=24, shuffle=True),  # 13 batches, shuffled
                      DataLoader(TensorDataset(x[300:], y[300:]), batch_size=16), device='cpu')
    torch.manual_seed(seed); random.seed(seed); np.random.seed(seed)  # a resumed process starts from other states
    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))

    class Augment(Callback):
        "Random augmentation with Python's and numpy's generators"
        def before_batch(self):
            if self.training: self.learn.xb = (self.xb[0]*(1 + 0.05*random.random()) + 0.05*float(np.random.randn()),)

    class Kill(Callback):
        order = 200
        def after_batch(self):
            if self.training and self.train_iter == kill_at: os.kill(os.getpid(), signal.SIGKILL)

    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy, lr=3e-3, default_cbs=False,
                    cbs=[TrainEvalCallback(), Recorder(train_metrics=True), Augment()])
    learn.logger = lambda row: None
    ckpt = CheckpointCallback(every_n_iters=5, every_epoch=True, path=folder, keep=2)
    ckpt.history_min = 8  # the per-batch histories go to side files (every 8 values), killed at any point of those writes too
    if mode == 'ref': learn.fit(3)
    elif mode == 'kill': learn.fit(3, cbs=[ckpt, Kill()])
    else:
        print('RESUMING FROM', ckpt.latest_checkpoint().name if ckpt.latest_checkpoint() else None, flush=True)
        learn.fit(3, cbs=[ckpt] + ([Kill()] if kill_at else []), resume='latest')
    torch.save({'weights': [p.detach() for p in learn.model.state_dict().values()], 'losses': learn.recorder.losses,
                'values': learn.recorder.values, 'lrs': learn.recorder.lrs, 'train_iter': learn.train_iter}, out)
''')

def run(tmp, mode, kill_at=0, seed=0):
    "Run the training script in a new process; returns the process and the file of its results"
    out = tmp/f'{mode}_{kill_at}_{seed}.pth'
    p = subprocess.run([sys.executable, '-c', SCRIPT, mode, str(out), str(tmp/'ckpt'), str(kill_at), str(seed)],
                       capture_output=True, text=True, timeout=TIMEOUT)
    return p, out

def check_same(a, b):
    a,b = torch.load(a, weights_only=True),torch.load(b, weights_only=True)
    assert len(a['weights']) == len(b['weights'])
    for x,y in zip(a['weights'], b['weights']): assert torch.equal(x, y)
    assert a['losses'] == b['losses']
    assert a['values'] == b['values']
    assert a['lrs'] == b['lrs'] and a['train_iter'] == b['train_iter']

N_ITER = 13  # training batches per epoch

@pytest.fixture(scope='module')
def ref_out(tmp_path_factory):
    "The uninterrupted training"
    ref,out = run(tmp_path_factory.mktemp('ref'), 'ref')
    assert ref.returncode == 0, ref.stderr
    return out

def test_sigkill_mid_epoch_then_resume(tmp_path, ref_out):
    rng = random.Random()
    seed = rng.randrange(10**6); rng.seed(seed)
    # a random iteration in the middle of epoch 2, after its first checkpoint (written at train_iter 15, after the batch)
    kill_at = N_ITER + rng.randrange(3, N_ITER-1)
    print(f'kill at training iteration {kill_at} (seed {seed})')
    killed,_ = run(tmp_path, 'kill', kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    files = sorted(p.name for p in (tmp_path/'ckpt').glob('checkpoint_*.pth'))
    assert len(files) == 2, files  # keep=2
    res,res_out = run(tmp_path, 'resume', seed=1)
    assert res.returncode == 0, res.stderr
    latest = res.stdout.split('RESUMING FROM ')[1].split()[0]
    assert '_epoch1_iter' in latest, latest  # the latest checkpoint is in the middle of epoch 2
    assert int(latest.split('iter')[1].split('.')[0]) < kill_at
    check_same(ref_out, res_out)

@pytest.mark.slow
def test_resume_twice(tmp_path, ref_out):
    "Killed in epoch 2, resumed, killed again in epoch 3, resumed again: still the uninterrupted training"
    k1,_ = run(tmp_path, 'kill', kill_at=N_ITER + 8)
    assert k1.returncode == -signal.SIGKILL, k1.stderr
    k2,_ = run(tmp_path, 'resume', kill_at=2*N_ITER + 3, seed=2)
    assert k2.returncode == -signal.SIGKILL, k2.stderr
    assert '_epoch1_iter20' in k2.stdout, k2.stdout
    res,res_out = run(tmp_path, 'resume', seed=3)
    assert res.returncode == 0, res.stderr
    assert '_epoch1_end' in res.stdout, res.stdout  # checkpoints at 25 and at the end of epoch 2 (26); killed at 29
    check_same(ref_out, res_out)

def test_resume_with_worker_processes(tmp_path):
    "A loader with worker processes and random augmentation inside them replays too (in-process interruption)"
    from torch import nn
    from torch.utils.data import DataLoader, Dataset
    from fastcb.core import Callback
    from fastcb.learner import Learner, DataLoaders
    from fastcb.checkpoint import CheckpointCallback
    class Augmented(Dataset):
        def __init__(self): g = torch.Generator().manual_seed(0); self.x = torch.randn(96, 4, generator=g); self.y = (self.x[:, 0] > 0).long()
        def __len__(self): return len(self.x)
        def __getitem__(self, i): return self.x[i] + 0.1*torch.randn(4), self.y[i]  # drawn in the worker
    def mk(seed=0):
        torch.manual_seed(seed)
        dls = DataLoaders(DataLoader(Augmented(), batch_size=8, shuffle=True, num_workers=2, timeout=60),
                          DataLoader(Augmented(), batch_size=32), device='cpu')
        l = Learner(dls, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), loss_func=nn.CrossEntropyLoss())
        l.logger = lambda row: None
        return l
    class Stop(Callback):
        def after_batch(self):
            if self.train_iter == 17: raise KeyboardInterrupt()
    ref = mk(); ref.fit(2)
    l = mk()
    with pytest.raises(KeyboardInterrupt): l.fit(2, cbs=[CheckpointCallback(every_n_iters=5, path=tmp_path), Stop()])
    l = mk(seed=3)
    l.fit(2, cbs=CheckpointCallback(every_n_iters=5, path=tmp_path), resume='latest')
    assert all(torch.equal(a, b) for a,b in zip(l.model.parameters(), ref.model.parameters()))
    assert l.recorder.losses == ref.recorder.losses and l.recorder.values == ref.recorder.values
