"""The loop's cost in Python and C function calls, as `sys.setprofile` counts them, over a hand-written loop on the same
model and batches: at most 30 extra calls per training batch and 20 per validation batch with the default callbacks
(those `import fastcb.all` installs: `TrainEvalCallback`, `Recorder`, the progress bar). Calls are counted, not timed:
the same count on every machine. A per-batch figure is the difference between a run of 2n and one of n batches, divided
by n, so that what a run costs once (the fit events, building the tables) cancels out. The hand-written loop uses the
optimizer implementation the learner picks (`fast_impl`: fused SGD here), so that only the loop is compared.

The last tests count ATen ops (with a `TorchDispatchMode`, views aside) instead: with its default optimizer (`Adam`,
which the learner builds fused), a training step runs no more ops than a hand-written loop with the same fused Adam,
and fewer than one with torch's plain `Adam` (what a user writes)."""
import collections, math, sys
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import fastcb.all  # noqa: F401  (the default callbacks users get)
from fastcb.core import Callback, CancelValidException
from fastcb.learner import Learner, DataLoaders
from fastcb.optim import fast_impl

TRAIN_BUDGET,VALID_BUDGET = 30,20

def _dls(n_batches, bs=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches*bs, 8, generator=g); y = torch.randint(0, 3, (n_batches*bs,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoaders(DataLoader(ds, batch_size=bs), DataLoader(ds, batch_size=bs), device='cpu')

def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

def _count(f):
    "Calls made while `f` runs: Python functions ('call') and C functions ('c_call'), by name"
    c = collections.Counter()
    def prof(frame, ev, arg):
        if ev == 'call': c[f'{frame.f_code.co_filename.rsplit("/", 1)[-1]}:{frame.f_code.co_name}'] += 1
        elif ev == 'c_call': c[f'C:{getattr(arg, "__qualname__", arg)}'] += 1
    sys.setprofile(prof)
    try: f()
    finally: sys.setprofile(None)
    return c

def _raw(n, train):
    "A hand-written loop over `n` batches: forward, loss (and backward, step, zero_grad in training)"
    model,lf,dl = _model(),nn.CrossEntropyLoss(),_dls(n).train
    opt = torch.optim.SGD(model.parameters(), lr=0.1, **fast_impl(torch.optim.SGD, list(model.parameters())))
    def run():
        model.train(train)
        with torch.set_grad_enabled(train):
            for xb,yb in dl:
                loss = lf(model(xb), yb)
                if train: loss.backward(); opt.step(); opt.zero_grad()
    return _count(run)

def _fastcb(n, train, cbs=()):
    "`fit(1)` with its validation cancelled (training), or `validate()`, over `n` batches"
    learn = Learner(_dls(n), _model(), nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1, cbs=list(cbs))
    for cb in learn.cbs:  # a bar that never redraws within the phase: redraws are time-based, counts must not be
        if type(cb).__name__ == 'ProgressCallback': cb.refresh = cb.plain_every = math.inf
    learn.create_opt()
    if train: learn.add_cb(Callback(before_validate=lambda self: (_ for _ in ()).throw(CancelValidException())))
    def run():
        with learn.no_logging():
            if train: learn.fit(1)
            else: learn.validate()
    return _count(run)

def _per_batch(f, n=10, **kwargs):
    "Calls per batch of `f`, and the Counter of the difference between 2n and n batches"
    f(n, **kwargs)  # warm up: first calls import and cache
    a,b = f(n, **kwargs),f(2*n, **kwargs)
    d = b.copy(); d.subtract(a)
    return sum(d.values())/n, d

def _extra(train, cbs=()):
    raw,rd = _per_batch(_raw, train=train)
    fc,fd = _per_batch(_fastcb, train=train, cbs=cbs)
    d = fd.copy(); d.subtract(rd)
    return fc - raw, sorted(((k, v/10) for k,v in d.items() if v), key=lambda t: -t[1])

def test_training_batch_within_budget():
    extra,where = _extra(train=True)
    assert extra <= TRAIN_BUDGET, f"{extra} extra calls per training batch (budget {TRAIN_BUDGET}): {where}"

def test_validation_batch_within_budget():
    extra,where = _extra(train=False)
    assert extra <= VALID_BUDGET, f"{extra} extra calls per validation batch (budget {VALID_BUDGET}): {where}"

def test_counter_sees_a_callback():
    "The guard itself: a callback acting on three batch events adds its three calls (and their dispatch) per batch"
    base,_ = _extra(train=True)
    cb = Callback(before_batch=lambda self: None, after_loss=lambda self: None, after_step=lambda self: None)
    more,where = _extra(train=True, cbs=[cb])
    # 3 callbacks + 3 `run_cbs`, and `learn.loss` is now a copy (`clone`); what other tests of the run left installed
    # (a default callback, a global mode) may add a call or two per batch: the counter must see at least these six
    assert 3*2 <= more - base <= 3*2 + 3, (more - base, where)

# ------------------------------------------------------------------------------------------------ ATen ops per step
from conftest import OpCounter

def _op_batches(n=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]

def _raw_step_ops(opt_kw, batches):
    "Ops per training batch of a hand-written loop with `Adam(**opt_kw)`"
    model,lf,c = _model(),nn.CrossEntropyLoss(),OpCounter()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **opt_kw)
    with c:
        for x,y in batches:
            c.start()
            loss = lf(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
            c.on = False
    return [sum(b.values()) for b in c.batches]

def _fastcb_step_ops(batches):
    "Ops per training batch of `fit(1)` with the learner's defaults (its optimizer included)"
    learn = Learner(DataLoaders(batches, batches, device='cpu'), _model(), nn.CrossEntropyLoss())
    for cb in learn.cbs:
        if type(cb).__name__ == 'ProgressCallback': cb.refresh = cb.plain_every = math.inf
    c,one_batch = OpCounter(),type(learn).one_batch
    def counted(i, b):
        if learn.training: c.start()
        try: return one_batch(learn, i, b)
        finally: c.on = False
    learn.one_batch = counted
    with c, learn.no_logging(): learn.fit(1)
    assert learn.opt.param_groups[0]['fused'], "the default optimizer is built fused on the CPU"
    return [sum(b.values()) for b in c.batches]

def test_default_optimizer_ops_at_most_raw_fused():
    batches = _op_batches()
    fc,fused = _fastcb_step_ops(batches),_raw_step_ops({'fused': True}, batches)
    assert len(fc) == len(fused) and all(f <= r for f,r in zip(fc, fused)), (fc, fused)

def test_default_optimizer_fewer_ops_than_raw_plain():
    batches = _op_batches()
    fc,plain = _fastcb_step_ops(batches),_raw_step_ops({}, batches)
    assert all(f < r for f,r in zip(fc, plain)), (fc, plain)
