"""Property tests (hypothesis) of the training loop's control flow, cleanup, callback ordering and exact resume.

Random callbacks raise random cancel exceptions (and other errors) at random events of `fit`, `validate` and
`get_preds`; the recorded event trace must follow the loop grammar of API.md, `after_fit` must run exactly once unless an
exception escapes (then `after_exception` runs once, last), the learner must be cleaned up, and it must then train exactly
like a fresh learner with the same weights and optimizer state."""
import copy, random, tempfile
from pathlib import Path
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from hypothesis import given, settings, strategies as st, HealthCheck, event as stat
from fastcb.core import *
from fastcb.learner import *

_EVENTS = [e for e in event if e not in ('after_create', 'after_exception')]  # what a callback may raise in

torch.set_num_threads(1)
LIMIT = 240  # seconds per test
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False)


# ---------------------------------------------------------------------------------------------------------------------
# The loop grammar of API.md, written as a recogniser that mirrors the scopes (it does not call fastcb's loop)

SCOPE_EXC = {'fit': 'CancelFitException', 'epoch': 'CancelEpochException', 'train': 'CancelTrainException',
             'validate': 'CancelValidException', 'batch': 'CancelBatchException',
             'backward': 'CancelBackwardException', 'step': 'CancelStepException'}

class Raised(Exception):
    def __init__(self, exc): self.exc = exc

class Grammar:
    "Consume a trace of events and `!Exc` raise markers, following the scopes of the loop; fail on any deviation"
    def __init__(self, trace, n_epoch, n_train, n_valid, phases):
        self.t,self.i,self.n_epoch,self.n_train,self.n_valid,self.phases = trace,0,n_epoch,n_train,n_valid,phases

    def ev(self, name):
        assert self.i < len(self.t), f"trace ended, expected {name} at {self.i}: {self.t}"
        assert self.t[self.i] == name, f"expected {name} at {self.i}, got {self.t[self.i]}: {self.t}"
        self.i += 1
        if self.i < len(self.t) and self.t[self.i].startswith('!'):
            self.i += 1
            raise Raised(self.t[self.i-1][1:])

    def scope(self, name, body):
        try: self.ev(f'before_{name}'); body()
        except Raised as r:
            if r.exc != SCOPE_EXC[name]: raise
            self.ev(f'after_cancel_{name}')
        self.ev(f'after_{name}')

    def batch(self, training):
        def body():
            self.ev('after_pred'); self.ev('after_loss')
            if training: self.scope('backward', lambda: None); self.scope('step', lambda: None)
        self.scope('batch', body)

    def epoch(self):
        if 'train' in self.phases: self.scope('train', lambda: [self.batch(True) for _ in range(self.n_train)])
        if self.n_valid: self.scope('validate', lambda: [self.batch(False) for _ in range(self.n_valid)])

    def run(self):
        "Parse the whole trace; returns the escaping exception's name or None"
        escaped = None
        try: self.scope('fit', lambda: [self.scope('epoch', self.epoch) for _ in range(self.n_epoch)])
        except Raised as r:
            escaped = r.exc
            self.ev('after_exception')
        assert self.i == len(self.t), f"trailing events {self.t[self.i:]}"
        return escaped

# ---------------------------------------------------------------------------------------------------------------------


def _hist(learn):
    "The history as plain floats (`recorder.losses` holds 0-d tensors, whose repr rounds), to compare bit for bit"
    return [float(l) for l in learn.recorder.losses], learn.recorder.values

def mk_dls(n_train, n_valid, bs=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(bs*(n_train+max(n_valid, 1)), 3, generator=g); y = x @ torch.tensor([1., -2., .5]) + 1
    tr = DataLoader(TensorDataset(x[:bs*n_train], y[:bs*n_train, None]), batch_size=bs, shuffle=True)
    if not n_valid: return DataLoaders(tr, device='cpu')
    return DataLoaders(tr, DataLoader(TensorDataset(x[bs*n_train:], y[bs*n_train:, None]), batch_size=bs), device='cpu')

def mk_learner(n_train, n_valid, seed=0):
    torch.manual_seed(seed)
    learn = Learner(mk_dls(n_train, n_valid), nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.1), nn.Linear(8, 1)),
                    loss_func=nn.MSELoss(), opt_func=torch.optim.Adam, lr=1e-2)
    learn.logger = _quiet
    return learn

def _quiet(row): pass

class TraceCb(Callback):
    "Records every event (it runs first)"
    order = -1000
    def __init__(self, trace): self.trace = trace
    def __call__(self, event_name):
        if event_name != 'after_create': self.trace.append(event_name)
        return super().__call__(event_name)

EXCS = {e.__name__: e for e in (CancelBatchException, CancelBackwardException, CancelStepException, CancelTrainException,
                                 CancelValidException, CancelEpochException, CancelFitException, ValueError, KeyboardInterrupt)}

def raiser(trace, event, exc, nth, order):
    "A callback raising `exc` the `nth` time `event` happens (and recording the raise in `trace`)"
    cb = Callback()
    cb.order,cb.count = order,0
    def _f(self):
        self.count += 1
        if self.count == nth:
            trace.append('!' + exc)
            raise EXCS[exc]('raised by the property test')
    setattr(cb, event, _f.__get__(cb))
    return cb

_batch_evs = ['before_batch', 'after_pred', 'after_loss', 'before_backward', 'after_cancel_backward', 'after_backward',
              'before_step', 'after_cancel_step', 'after_step']
_in_try = {'step': ['before_step'], 'backward': ['before_backward'], 'batch': _batch_evs,
           'train': ['before_train', *_batch_evs, 'after_cancel_batch', 'after_batch'],
           'validate': ['before_validate', *_batch_evs, 'after_cancel_batch', 'after_batch']}
_in_try['epoch'] = ['before_epoch', *_in_try['train'], 'after_cancel_train', 'after_train', *_in_try['validate'],
                    'after_cancel_validate', 'after_validate']
_in_try['fit'] = ['before_fit', *_in_try['epoch'], 'after_cancel_epoch', 'after_epoch']

def _exc_for(ev):
    "Half the time a cancel whose scope is running at `ev` (so that the loop catches it), else any exception"
    caught = [SCOPE_EXC[k] for k,evs in _in_try.items() if ev in evs]
    return st.one_of(st.sampled_from(caught), st.sampled_from(sorted(EXCS))) if caught else st.sampled_from(sorted(EXCS))

raisers_st = st.lists(st.sampled_from(_EVENTS).flatmap(
    lambda ev: st.tuples(st.just(ev), _exc_for(ev), st.sampled_from([1, 1, 2, 3]), st.integers(-30, 60), st.booleans())),
    min_size=1, max_size=4)

def snapshot(learn):
    return dict(cbs=[id(c) for c in learn.cbs], run=[c.run for c in learn.cbs], batch=(learn.dl, learn.xb, learn.yb, learn.pred, learn.loss),
                fitting=learn.fitting, exception=learn.exception, grad_on=torch.is_grad_enabled(), logger=learn.logger)

def twin(learn, n_train, n_valid):
    t = mk_learner(n_train, n_valid, seed=1)
    t.model.load_state_dict(learn.model.state_dict())
    if learn.opt is not None: t.create_opt(); t.opt.load_state_dict(copy.deepcopy(learn.opt.state_dict()))
    return t

def weights(l): return [p.detach().clone() for p in l.model.parameters()]

try:
    import fastcb.preds  # noqa: F401  (patches get_preds)
    CALLS = ['fit', 'validate', 'get_preds']
except ImportError: CALLS = ['fit', 'validate']

@settings(max_examples=250, **SETTINGS)
@given(n_epoch=st.integers(1, 2), n_train=st.integers(1, 2), n_valid=st.integers(0, 2), specs=raisers_st,
       call=st.sampled_from(CALLS), pre_fit=st.booleans())
def test_loop_grammar_and_cleanup(n_epoch, n_train, n_valid, specs, call, pre_fit):
    if call != 'fit': n_valid = max(n_valid, 1)  # validate/get_preds use the validation loader
    learn = mk_learner(n_train, n_valid)
    if pre_fit: learn.fit(1)  # a trained learner: the model is in eval mode, the Recorder has a history
    trace = []
    learn.add_cb(TraceCb(trace))
    tmp,perm = [],[]
    for event,exc,nth,order,temporary in specs:
        (tmp if temporary else perm).append(raiser(trace, event, exc, nth, order))
    learn.add_cbs(perm)
    before,mode,w = snapshot(learn),learn.model.training,weights(learn)
    hist = ([float(l) for l in learn.recorder.losses], [list(v) for v in learn.recorder.values])
    escaped = None
    try:
        if call == 'fit': learn.fit(n_epoch, cbs=tmp)
        elif call == 'validate': learn.validate(cbs=tmp)
        else: learn.get_preds(cbs=tmp)
    except (Exception, KeyboardInterrupt) as e: escaped = type(e).__name__

    stat(f'{call}: escaped {escaped}'); stat(f"cancel events: {sum(t.startswith('after_cancel') for t in trace)}")
    # 1. the trace follows the loop grammar, and the exception that escaped is the one the grammar says escapes
    g = Grammar(trace, n_epoch if call == 'fit' else 1, n_train, n_valid, ('train',) if call == 'fit' else ())
    assert g.run() == escaped, (escaped, trace)
    # 2. after_fit exactly once unless an exception escaped; then after_exception exactly once, last
    if escaped is None: assert trace.count('after_fit') == 1 and 'after_exception' not in trace, trace
    else: assert trace.count('after_exception') == 1 and trace[-1] == 'after_exception' and trace.count('after_fit') <= 1, trace
    # 3. cleanup: temporary callbacks gone, run flags reset, per-batch state released, mode restored on an error
    assert snapshot(learn) == before
    if escaped is not None: assert learn.model.training == mode
    if call == 'fit': assert all(p.grad is None for p in learn.model.parameters())  # no gradients left behind
    if call != 'fit':  # evaluation changes neither the weights nor the training history
        assert all(torch.equal(a, b) for a,b in zip(w, weights(learn)))
        assert repr(([float(l) for l in learn.recorder.losses], learn.recorder.values)) == repr(hist)
    # 4. the learner trains afterwards exactly like a fresh one with the same weights and optimizer state
    learn.remove_cbs(perm)
    fresh = twin(learn, n_train, n_valid)
    torch.manual_seed(3); learn.fit(1)
    torch.manual_seed(3); fresh.fit(1)
    assert all(torch.equal(a, b) for a,b in zip(weights(learn), weights(fresh)))
    assert repr(_hist(learn)) == repr(_hist(fresh))
    assert all(torch.isfinite(torch.tensor(learn.recorder.losses)))

# ---------------------------------------------------------------------------------------------------------------------
# Ordering with run_before / run_after

@settings(max_examples=300, **SETTINGS)
@given(orders=st.lists(st.integers(-3, 3), min_size=1, max_size=7), data=st.data())
def test_ordering(orders, data):
    n = len(orders)
    classes = [type(f'K{i}', (Callback,), {'order': o}) for i,o in enumerate(orders)]
    cbs = [k() for k in classes]
    pairs = data.draw(st.lists(st.tuples(st.integers(0, n-1), st.integers(0, n-1), st.booleans(),
                                         st.sampled_from(['class', 'name', 'classname'])), max_size=6))
    edges = set()
    for a,b,before,how in pairs:
        if a == b: continue
        ref = {'class': classes[b], 'name': cbs[b].name, 'classname': classes[b].__name__}[how]
        attr = 'run_before' if before else 'run_after'
        cbs[a].__dict__[attr] = [*cbs[a].__dict__.get(attr, []), ref]
        edges.add((a, b) if before else (b, a))
    # is there a cycle?
    succ = {i: {j for (a,j) in edges if a == i} for i in range(n)}
    def reach(i, seen):
        for j in succ[i]:
            if j not in seen: seen.add(j); reach(j, seen)
        return seen
    cyclic = any(i in reach(i, set()) for i in range(n))
    if cyclic:
        with pytest.raises(ValueError, match='cycle') as e: sort_cbs(cbs)
        # the cycle named is a real cycle: each step is a constraint
        steps = str(e.value).split(': ', 1)[1].split('. Remove')[0].split('; ')
        names = [s.split(' before ')[0] for s in steps] + [steps[0].split(' before ')[0]]
        idx = [int(x[1:]) for x in names]
        assert all((a, b) in edges for a,b in zip(idx, idx[1:])), (str(e.value), edges)
        return
    res = sort_cbs(cbs)
    pos = {id(c): k for k,c in enumerate(res)}
    assert sorted(pos.values()) == list(range(n))
    assert all(pos[id(cbs[a])] < pos[id(cbs[b])] for a,b in edges)
    # the rule: each callback is the lowest (order, insertion) among those whose constraints are met
    placed = set()
    for c in res:
        i = cbs.index(c)
        ready = [j for j in range(n) if j not in placed and all(a in placed for (a,b) in edges if b == j)]
        assert i == min(ready, key=lambda j: (orders[j], j))
        placed.add(i)
    if not edges: assert res == sorted(cbs, key=lambda c: c.order)

# ---------------------------------------------------------------------------------------------------------------------
# Exact resume from a random interruption point (in-process; tests/test_resume.py does it across processes with SIGKILL)

@settings(max_examples=25, **SETTINGS)
@given(kill_at=st.integers(1, 17), every=st.integers(1, 7), every_epoch=st.booleans(), n_epoch=st.integers(2, 3))
def test_resume_anywhere(kill_at, every, every_epoch, n_epoch):
    from fastcb.checkpoint import CheckpointCallback
    class Stop(Callback):
        def after_batch(self):
            if self.train_iter == kill_at: raise KeyboardInterrupt()
    def jitter(self): self.learn.xb = (self.xb[0] + 0.01*random.random(),)
    mk = lambda seed=0: mk_learner(6, 1, seed=seed)
    random.seed(0); ref = mk(); ref.add_cb(Callback(before_batch=jitter)); ref.fit(n_epoch)
    d = Path(tempfile.mkdtemp())
    random.seed(0); l = mk(); l.add_cb(Callback(before_batch=jitter))
    ckpt = CheckpointCallback(every_n_iters=every, every_epoch=every_epoch, path=d)
    try: l.fit(n_epoch, cbs=[ckpt, Stop()]); finished = True
    except KeyboardInterrupt: finished = False
    fresh_start = ckpt.latest_checkpoint() is None  # interrupted before the first checkpoint: resume starts afresh
    # a restart continues an interrupted run from other initial weights; a finished run is only adopted by the same
    # run (same initial weights: another seed is another run, which trains its own)
    same = fresh_start or finished
    random.seed(0 if same else 5); l = mk(seed=0 if same else 4); l.add_cb(Callback(before_batch=jitter))
    with __import__('warnings').catch_warnings():
        __import__('warnings').simplefilter('ignore')  # 'latest' with no checkpoint yet: trains from the start
        l.fit(n_epoch, cbs=CheckpointCallback(every_n_iters=every, every_epoch=every_epoch, path=d), resume='latest')
    assert all(torch.equal(a, b) for a,b in zip(weights(l), weights(ref)))
    assert repr(_hist(l)) == repr(_hist(ref))
