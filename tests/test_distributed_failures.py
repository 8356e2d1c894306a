"""`distrib_ctx` when the processes disagree, fail, hang or resume: `torchrun --standalone --nproc_per_node 2` (gloo).

Three torchrun jobs, each bounded by a timeout (a hang fails the test):
- AGREE: scenarios that must fail at once, on both processes, naming the difference (loaders of different lengths, a
  learning rate or a schedule that differs, a validate on one process only, a process that caught an exception and went
  on), and evaluation that must give exactly what one process gives (drop_last, reorder=False, shuffled);
- HANG: a process stuck, or out of step between two collectives that cannot meet: the others stop after
  `distrib_ctx(timeout=...)` with an error that says where every process is;
- RESUME: a run with per-process seeds and dropout, killed (SIGKILL of rank 1), restarted by `torchrun --max-restarts 1`
  with `fit(resume='latest')`: the same weights as an uninterrupted run.
Each scenario records the error each process got and the seconds it took to surface.
"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import pytest
from test_distributed import torchrun, COMMON, pytestmark  # noqa: F401  (the same skip when gloo is missing)

PRELUDE = '''
import os, sys, time, torch
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fastcb.core import Callback
from fastcb.learner import Learner, DataLoaders
import fastcb.preds, fastcb.schedule
from fastcb.distributed import rank_distrib
from fastcb.comm import OutOfStepError, CommunicationError
from common import data, model
out,rank = Path(sys.argv[1]),int(os.environ['RANK'])
R = {}
x,y = data(256)
def mk(n=256, bs=16, **kw):
    dls = DataLoaders(DataLoader(TensorDataset(x[:n], y[:n]), batch_size=bs), DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16))
    return Learner(dls, model(), loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1, **kw)
def scenario(name, f, timeout=60.):
    "Run `f(learn)` in a distrib_ctx; record the error (type: message) and the seconds until it surfaced"
    learn = mk()
    t0 = time.monotonic()
    try:
        with learn.distrib_ctx(timeout=timeout): f(learn)
        R[name] = (None, time.monotonic() - t0)
    except Exception as e:
        R[name] = (f"{type(e).__name__}: {e}" + ''.join(f"\\n{n}" for n in getattr(e, '__notes__', [])), time.monotonic() - t0)
'''

AGREE = PRELUDE + '''
# (1) loaders of different lengths: 224 items on rank 1, 256 on rank 0 -> 7 vs 8 batches per process
def lengths(learn):
    learn.dls = mk(n=256 - 32*rank).dls
    learn.fit(1)
scenario('lengths', lengths)
# (2) a learning rate that differs (a per-rank config)
scenario('lr', lambda learn: learn.fit(1, lr=0.1*(rank+1)))
# (3) a schedule that differs: only seen at the first training batch
scenario('schedule', lambda learn: learn.fit_one_cycle(1, lr_max=0.1*(rank+1)))
# (4) a validate on rank 0 only, then the context ends
def only0(learn):
    if rank == 0: learn.validate()
scenario('validate_rank0_exit', only0)
# (5) a validate on rank 0 only, then a fit everywhere
def only0_fit(learn):
    if rank == 0: learn.validate()
    learn.fit(1)
scenario('validate_rank0_fit', only0_fit)
# (6) a validate nested in fit, started by a callback on rank 0 only (at the end of an epoch)
def nested(self):
    if rank == 0: self.learn.validate()
scenario('nested', lambda learn: learn.fit(1, cbs=Callback(after_epoch=nested)))
# (7) rank 1 catches an error raised in its get_preds and goes on (to a fit)
def bad_batch(self):
    if rank == 1 and self.learn.iter == 1: raise ValueError('bad batch on rank 1')
def caught(learn):
    try: learn.get_preds(cbs=Callback(before_batch=bad_batch))
    except ValueError: pass
    learn.fit(1)
scenario('caught', caught)
# (8) the same error on both processes, caught by both: they are still in step and go on
def both(self):
    if self.learn.iter == 1: raise ValueError('bad batch everywhere')
def caught_both(learn):
    import fastcb.distributed
    fastcb.distributed.DDPStrategy.fail_wait = 20.  # how long a failed process waits for the others' failure: margin for a busy machine
    try: learn.get_preds(cbs=Callback(before_batch=both))
    except ValueError: pass
    R['after_caught_both'] = learn.validate()
scenario('caught_both', caught_both)

# (9) evaluation gives what one process gives: drop_last, reorder=False, shuffled (the same seed on both processes)
xb,yb = data(37, seed=5)
def loader(**kw): return DataLoader(TensorDataset(xb, yb), batch_size=4, **kw)
learn = mk()
with learn.distrib_ctx():
    for name,kw,reorder in [('drop_last', dict(drop_last=True), False), ('drop_last_reordered', dict(drop_last=True), True),
                            ('shuffled', dict(shuffle=True), False), ('shuffled_drop_last', dict(shuffle=True, drop_last=True), False)]:
        torch.manual_seed(7)
        R['preds_' + name] = learn.get_preds(dl=loader(**kw), reorder=reorder, with_input=True)
        R['rng_after_' + name] = torch.rand(1)  # get_preds leaves the random state as it was
    torch.manual_seed(7 + rank)  # per-process seeds: the processes draw other orders, rank 0's is used
    R['preds_shuffled_per_rank_seed'] = learn.get_preds(dl=loader(shuffle=True), reorder=False, with_input=True)
    torch.manual_seed(7)
    R['validate_shuffled_drop_last'] = learn.validate(dl=loader(shuffle=True, drop_last=True))
    R['rng_after_validate'] = torch.rand(1)  # validate draws as one process draws
    learn.dls = DataLoaders(learn.dls.train, loader(shuffle=True, drop_last=True))
    torch.manual_seed(7)
    learn.fit(2)  # a shuffled validation loader with drop_last, drawn anew each epoch
    R['fit_values'] = learn.recorder.values
torch.save(R, out/f'rank{rank}.pt')

# (10) last: rank 1 ends 2 s into a distrib_ctx, before any run, as a killed process does (no error published, its
# connections closed; exit code 0, so torchrun lets rank 0 finish); rank 0 starts a fit 3.5 s in
def early(learn):
    time.sleep(2 if rank == 1 else 3.5)
    if rank == 1: os._exit(0)
    learn.fit(1)
scenario('killed_early', early, timeout=30)
torch.save(R, out/f'rank{rank}.pt')
'''


@pytest.fixture(scope='module')
def agree(tmp_path_factory):
    folder = tmp_path_factory.mktemp('agree')
    rc, output, secs = torchrun(AGREE, folder, timeout=240)
    assert rc == 0, output[-6000:]
    print(f"AGREE job: {secs:.0f} s")
    return [torch.load(folder/f'rank{r}.pt', weights_only=False) for r in range(2)]


def _errors(res, name, fast=True):
    "The errors of scenario `name` on both processes; each surfaced within seconds when `fast`"
    errs = [r[name][0] for r in res]
    if fast: assert all(r[name][1] < 20 for r in res), [r[name][1] for r in res]
    return errs


def test_loaders_of_different_lengths_fail_at_once(agree):
    for e in _errors(agree, 'lengths'):
        assert e.startswith("OutOfStepError: The loaders have {'training': 8, 'validation': 2} batches on rank 0 but "
                            "{'training': 7, 'validation': 2} on rank 1"), e


def test_learning_rate_that_differs_fails_at_once(agree):
    for e in _errors(agree, 'lr'):
        assert e.startswith("OutOfStepError: The optimizer's lr (param group 0) is 0.1 on rank 0 but 0.2 on rank 1"), e
    for e in _errors(agree, 'schedule'):  # set by the scheduler: seen at the first training batch
        assert e.startswith("OutOfStepError: The optimizer's lr (param group 0) is 0.004") and 'on rank 1' in e, e


def test_validate_on_one_rank_only_fails_on_both(agree):
    e0, e1 = _errors(agree, 'validate_rank0_exit')
    for e in (e0, e1):
        assert e.startswith("OutOfStepError: The processes are out of step: rank 0: validate (sync point 'start of a "
                            "run'); rank 1: distrib_ctx, before any fit/validate/get_preds (sync point 'exit of "
                            "distrib_ctx')"), e
    for e in _errors(agree, 'validate_rank0_fit'):
        assert e.startswith("OutOfStepError: Rank 0 is starting a validate but rank 1 a fit"), e


def test_nested_validate_on_one_rank_only_fails_on_both(agree):
    for e in _errors(agree, 'nested'):
        assert e.startswith("OutOfStepError: The processes are out of step: rank 0: validate (nested in fit), epoch 0, "
                            "validation iter 1 of 2 (sync point 'start of a run'); rank 1: fit, epoch 0, validation "
                            "iter 1 of 2 (sync point 'end of after_epoch')"), e


def test_error_caught_on_one_rank_stops_both(agree):
    e0, e1 = _errors(agree, 'caught')
    assert e0.startswith("CommunicationError: A collective failed on rank 0: ") and 'Connection closed by peer' in e0, e0
    assert "rank 0 (this process): get_preds, validation iter 1 of 2 (sync point 'end of before_batch')" in e0, e0
    assert "rank 1: failed at get_preds, validation iter 1 of 2: ValueError: bad batch on rank 1" in e0, e0
    assert e1.startswith("RuntimeError: distrib_ctx cannot start a run: rank 1 failed alone (ValueError: bad batch on rank "
                         "1): the processes are out of step"), e1


def test_same_error_on_every_rank_keeps_them_in_step(agree):
    assert [r['caught_both'][0] for r in agree] == [None, None]
    assert agree[0]['after_caught_both'] == agree[1]['after_caught_both']


def test_process_gone_before_any_run_reported_as_it_last_was(agree):
    e, secs = agree[0]['killed_early']
    assert secs < 20, secs
    assert e.startswith("CommunicationError: A collective failed on rank 0: "), e
    assert "rank 0 (this process): distrib_ctx, before any fit/validate/get_preds" not in e, e  # it was in its fit
    assert "rank 0 (this process): fit, epoch 0 (sync point 'start of a run')" in e, e
    # how long rank 1 had been there at its last news (about 2 s: not the 3.5 s since it got there), and how long ago
    line = next(l for l in e.splitlines() if l.strip().startswith('rank 1: '))
    assert line.strip().startswith("rank 1: distrib_ctx, before any fit/validate/get_preds, for "), line
    assert " s (last news " in line and "outside" not in line, line
    assert int(line.split(', for ')[1].split(' s')[0]) <= 2, line
    assert ("A closed connection: another process ended (killed, out of memory...) or gave up its groups; its line above "
            "is its last news.") in e, e
    assert 'killed_early' not in agree[1]


def _single_preds(name, kw, reorder):
    from fastcb.learner import Learner, DataLoaders
    import fastcb.preds  # noqa: F401
    ns = {}
    exec(COMMON, ns)
    xb, yb = ns['data'](37, seed=5)
    x, y = ns['data'](256)
    learn = Learner(DataLoaders(DataLoader(TensorDataset(x, y), batch_size=16), device='cpu'), ns['model'](),
                    loss_func=nn.CrossEntropyLoss())
    torch.manual_seed(7)
    res = learn.get_preds(dl=DataLoader(TensorDataset(xb, yb), batch_size=4, **kw), reorder=reorder, with_input=True)
    return res, torch.rand(1), learn


def test_get_preds_exact_for_every_loader_option(agree):
    for name, kw, reorder in [('drop_last', dict(drop_last=True), False), ('drop_last_reordered', dict(drop_last=True), True),
                              ('shuffled', dict(shuffle=True), False),
                              ('shuffled_drop_last', dict(shuffle=True, drop_last=True), False)]:
        (inp, p, t), rng, learn = _single_preds(name, kw, reorder)
        for r in agree:
            ri, rp, rt = r['preds_' + name]
            assert ri.shape == inp.shape and torch.equal(ri, inp), name  # the same items, in the same order
            assert torch.equal(rt, t), name
            torch.testing.assert_close(rp, p, atol=1e-5, rtol=0)
            assert torch.equal(r['rng_after_' + name], rng), name
    assert agree[0]['preds_drop_last'][0].shape[0] == 36 and agree[0]['preds_drop_last_reordered'][0].shape[0] == 37
    (inp, p, t), _, _ = _single_preds('shuffled', dict(shuffle=True), False)
    for r in agree: assert torch.equal(r['preds_shuffled_per_rank_seed'][0], inp)


def test_validate_shuffled_drop_last_exact(agree):
    from fastcb.learner import Learner, DataLoaders
    ns = {}
    exec(COMMON, ns)
    xb, yb = ns['data'](37, seed=5)
    x, y = ns['data'](256)
    learn = Learner(DataLoaders(DataLoader(TensorDataset(x, y), batch_size=16), device='cpu'), ns['model'](),
                    loss_func=nn.CrossEntropyLoss())
    torch.manual_seed(7)
    v = learn.validate(dl=DataLoader(TensorDataset(xb, yb), batch_size=4, shuffle=True, drop_last=True))
    rng = torch.rand(1)
    for r in agree:
        torch.testing.assert_close(torch.tensor(r['validate_shuffled_drop_last']), torch.tensor(v), atol=1e-5, rtol=0)
        assert torch.equal(r['rng_after_validate'], rng)
    assert agree[0]['fit_values'] == agree[1]['fit_values']


HANG = PRELUDE + '''
# (1) rank 1 stuck for 16 s in a batch (a slow data source, a deadlock): rank 0 gives up after the timeout (8 s)
class Stuck(Callback):
    agree_cancels = False
    def before_batch(self):
        if rank == 1 and self.learn.iter == 3: time.sleep(16)
scenario('stuck', lambda learn: learn.fit(1, cbs=Stuck()), timeout=8)
# (2) a gather on rank 0 only (`learn.to_detach` outside any run) while rank 1 leaves the context: two collectives of
# different groups, that cannot meet: both give up after the timeout
def gather0(learn):
    if rank == 0: learn.to_detach(torch.ones(2))
scenario('gather_rank0', gather0, timeout=8)
torch.save(R, out/f'rank{rank}.pt')
'''


@pytest.fixture(scope='module')
def hang(tmp_path_factory):
    folder = tmp_path_factory.mktemp('hang')
    rc, output, secs = torchrun(HANG, folder, timeout=180)
    assert rc == 0, output[-6000:]
    print(f"HANG job: {secs:.0f} s")
    return [torch.load(folder/f'rank{r}.pt', weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_stuck_rank_named_after_the_timeout(hang):
    (e0, t0), (e1, t1) = hang[0]['stuck'], hang[1]['stuck']
    assert 7.5 < t0 < 40, t0  # the timeout (8 s), not 30 minutes
    assert e0.startswith("CommunicationError: A collective failed on rank 0: ") and 'Timed out' in e0, e0
    assert "rank 0 (this process): fit, epoch 0, training iter 3 of 8 (" in e0, e0  # (the collective it waits in)
    assert "rank 1: fit, epoch 0, training iter 3 of 8, for " in e0, e0
    # rank 1, awake again, finds rank 0 gone: told at once, with rank 0's reason
    assert e1.startswith("CommunicationError: A collective failed on rank 1: ") and 'Connection closed' in e1, e1
    assert "rank 0: failed at fit, epoch 0, training iter 3 of 8 (" in e1 and "): gave up waiting (" in e1, e1


@pytest.mark.slow
def test_collectives_that_cannot_meet_end_after_the_timeout(hang):
    for r, (e, t) in enumerate(r['gather_rank0'] for r in hang):
        assert 7.5 < t < 40, t  # the timeout (8 s; twice for a gather: two collectives)
        assert e.startswith(f"CommunicationError: A collective failed on rank {r}: ") and 'Timed out' in e, e
        assert "distrib_ctx, before any fit/validate/get_preds (sync point 'exit of distrib_ctx')" in e, e


RESUME = PRELUDE + '''
import signal
from fastcb.checkpoint import CheckpointCallback
attempt = int(os.environ.get('TORCHELASTIC_RESTART_COUNT', 0))
def mkd():
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3)),
                      DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16))
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
    return Learner(dls, m, loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1)
def fit(learn, folder, **kw):
    with learn.distrib_ctx():
        torch.manual_seed(100 + rank)  # per-process randomness: other dropout masks on each process
        learn.fit(2, cbs=[CheckpointCallback(every_n_iters=3, path=out/folder, keep=None)] + kw.pop('cbs', []), **kw)
    return {k: v.clone() for k,v in learn.model.state_dict().items()}
def kill(self):
    if rank == 1 and self.learn.train_iter == 13: os.kill(os.getpid(), signal.SIGKILL)
if attempt == 0:
    torch.save(fit(mkd(), 'ref'), out/f'uninterrupted{rank}.pt')
    fit(mkd(), 'ckpt', cbs=[Callback(before_batch=kill)])  # rank 1 dies after 13 batches: torchrun restarts the job
else: torch.save(fit(mkd(), 'ckpt', resume='latest'), out/f'resumed{rank}.pt')
'''


@pytest.mark.slow
def test_resume_after_a_kill_with_per_rank_randomness(tmp_path):
    rc, output, secs = torchrun(RESUME, tmp_path, timeout=240, args=('--max-restarts', '1'))
    assert rc == 0, output[-6000:]
    print(f"RESUME job: {secs:.0f} s")
    files = sorted((tmp_path/'ckpt').glob('checkpoint_*.pth'))
    # before the kill: every 3 batches and at the end of epoch 0 (8 batches an epoch); after: batch 15, the end of the fit (`final`)
    assert [f.name.split('_')[-1] for f in files] == ['iter3.pth', 'iter6.pth', 'end.pth', 'iter9.pth', 'iter12.pth',
                                                      'iter15.pth', 'final.pth'], files
    sd = torch.load(files[4], weights_only=True)
    rr = sd['rng_ranks']
    assert len(rr) == 2 and not torch.equal(rr[0]['rng']['torch'], rr[1]['rng']['torch'])  # each process's own state
    assert torch.equal(rr[0]['rng']['torch'], sd['rng']['torch'])
    for r in range(2):
        ref = torch.load(tmp_path/f'uninterrupted{r}.pt')
        res = torch.load(tmp_path/f'resumed{r}.pt')
        for k, v in ref.items(): assert torch.equal(res[k], v), k
