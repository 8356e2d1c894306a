"Larger get_preds checks than the notebook runs, and a smoke test of bench/preds_memory.py (no timing or memory assertions)"
import subprocess, sys, weakref
from pathlib import Path
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fastcb.core import Callback
from fastcb.learner import Learner, DataLoaders
from fastcb.preds import load_preds

ROOT = Path(__file__).resolve().parents[1]

def _learner(n=10_000, d=50, bs=64):
    torch.manual_seed(0)
    x, y = torch.randn(n, 8), torch.randint(0, d, (n,))
    train = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True, drop_last=True, num_workers=2)
    valid = DataLoader(TensorDataset(x, y), batch_size=bs)
    return Learner(DataLoaders(train, valid, device='cpu'), nn.Linear(8, d), loss_func=nn.CrossEntropyLoss()), x, y

def test_many_batches_in_order_and_exact_size():
    learn, x, y = _learner()
    preds, targs = learn.get_preds(ds_idx=0)  # shuffled, drop_last, 2 workers: 157 batches, the last one smaller
    assert torch.equal(targs, y)
    with torch.no_grad(): assert torch.allclose(preds, learn.model(x), atol=1e-5)
    assert preds.untyped_storage().nbytes() == preds.numel() * preds.element_size()  # preallocated, no slack
    p2, t2 = learn.get_preds()  # the sequential loader, used as it is
    assert torch.equal(p2, preds) and torch.equal(t2, y)

class _BatchRefs(Callback):
    "Weak references to each batch's tensors; in every `after_batch`, counts those of the earlier batches still alive"
    order = 100  # after every other callback has seen the batch
    def __init__(self, names): self.names,self.refs,self.alive = names,[],dict.fromkeys(names, 0)
    def after_batch(self):
        for r in self.refs:
            for n,w in r.items(): self.alive[n] += w() is not None
        get = lambda n: getattr(self.learn, n)[0] if n in ('xb', 'yb') else getattr(self.learn, n)
        self.refs.append({n: weakref.ref(get(n)) for n in self.names})

# On the CPU a tensor kept from every batch, however small, pins a hole in the C heap that a freed batch-sized
# temporary (the model's output, the loss's) left: the heap then grows by about a batch per batch, up to 2x the
# predictions in some processes and not in others (bench/preds_memory.py shows the spread). So nothing may keep a
# batch's tensors once the next batch has started: not the gatherer, not the learner, not a default callback.
def test_no_batch_kept_alive():
    learn, x, y = _learner(n=2_000)
    refs = _BatchRefs(['pred', 'xb', 'yb'])
    preds, targs = learn.get_preds(ds_idx=0, with_input=True, cbs=refs)[1:]
    assert len(refs.refs) == 32 and refs.alive == {'pred': 0, 'xb': 0, 'yb': 0}, refs.alive
    assert torch.equal(targs, y)

def test_no_batch_loss_kept_alive():
    learn, x, y = _learner(n=2_000)
    refs = _BatchRefs(['loss'])
    learn.get_preds(ds_idx=0, cbs=refs)
    assert len(refs.refs) == 32 and refs.alive == {'loss': 0}, refs.alive

def test_stream_many_batches(tmp_path):
    learn, x, y = _learner()
    p, t = learn.get_preds(ds_idx=1, with_preds=False, with_targs=False, save_preds=tmp_path, save_targs=tmp_path)
    assert p is None and t is None
    assert len(list(tmp_path.glob('preds_000_*.pth'))) == 157
    with torch.no_grad(): assert torch.allclose(load_preds(tmp_path), learn.model(x), atol=1e-5)
    assert torch.equal(load_preds(tmp_path, 'targs'), y)

@pytest.mark.slow  # 9 s: a smoke run of bench/preds_memory.py (a benchmark, not a behaviour)
def test_bench_runs():
    r = subprocess.run([sys.executable, str(ROOT/'bench'/'preds_memory.py'), '--n', '3000', '--d', '100', '--bs', '256',
                        '--repeat', '1', '--cases', 'list,load_preds'], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for case in ['torch list + cat', 'fastcb load_preds']: assert case in r.stdout
    assert 'failed' not in r.stdout, r.stdout
