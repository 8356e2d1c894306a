"""`Learner.distrib_ctx` with 2 real processes: `torchrun --standalone --nproc_per_node 2` on the CPU (gloo).

One torchrun job runs most scenarios (each process saves what it saw), the tests compare it with single-process runs
made here; a second job crashes on purpose. Every job is bounded by a timeout and killed with its workers on expiry,
so a hang fails the test instead of blocking the suite.
"""
import os, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from conftest import kill_tree, process_tree

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="this torch build has no torch.distributed gloo backend")
JOB_TIMEOUT = 240  # seconds; the jobs take ~10-30 s on 2 idle cores

COMMON = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

def data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x @ torch.randn(8, 3, generator=g)).argmax(1)

def model(hidden=16):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3))  # no dropout

def acc(pred, targ): return (pred.argmax(-1) == targ).float().mean()

def tokens(n=19):
    "Sequences of 2 to 9 tokens (of 10) with a class (of 3) per token"
    g = torch.Generator().manual_seed(7)
    lens = [2 + i % 8 for i in range(n)]  # under 2 processes, rank 0's batches are shorter than rank 1's
    return [(torch.randint(0, 10, (l,), generator=g), torch.randint(0, 3, (l,), generator=g)) for l in lens]

def token_collate(items):
    "Pad a batch to its longest sequence: tokens with 0, targets with -100 (which the loss ignores)"
    L = max(len(x) for x,_ in items)
    xs = torch.stack([torch.cat([x, x.new_zeros(L-len(x))]) for x,_ in items])
    ys = torch.stack([torch.cat([y, y.new_full((L-len(y),), -100)]) for _,y in items])
    return xs, ys

class TokenModel(nn.Module):
    "A class per token from the token alone: outputs at real positions do not depend on the batch's padding"
    def __init__(self):
        super().__init__(); torch.manual_seed(2); self.emb,self.out = nn.Embedding(10, 8),nn.Linear(8, 3)
    def forward(self, x): return self.out(self.emb(x))

def token_loss(pred, targ): return nn.functional.cross_entropy(pred.flatten(0, 1), targ.flatten())  # -100: ignored
'''

MAIN = '''
import os, sys, torch
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fastcb.core import Callback, CancelFitException
from fastcb.learner import Learner, DataLoaders
import fastcb.progress, fastcb.preds, fastcb.profile
from fastcb.tracker import EarlyStoppingCallback, SaveModelCallback, TerminateOnNaNCallback
from fastcb.metrics import CSVLogger
from fastcb.checkpoint import CheckpointCallback
from fastcb.distributed import rank_distrib, num_distrib
from common import data, model, acc
out,rank = Path(sys.argv[1]),int(os.environ['RANK'])
R = {}
x,y = data(256)
def mk(bs=16, shuffle=False, **kw):
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=shuffle, generator=torch.Generator().manual_seed(3)),
                      DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16))
    return Learner(dls, model(kw.pop('hidden', 16)), loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1, **kw)

# (a) one epoch of SGD, 2 processes x batch 16;  (b) get_preds/validate on 37 items (not a multiple of 2 x 16)
learn = mk(metrics=acc)
dls = learn.dls
with learn.distrib_ctx():
    R['ranks'] = (rank_distrib(), num_distrib())
    learn.fit(1)
    R['values'] = learn.recorder.values
    xb,yb = data(37, seed=5)
    pdl = DataLoader(TensorDataset(xb, yb), batch_size=16)
    R['preds'] = learn.get_preds(dl=pdl)
    R['preds_all'] = learn.get_preds(dl=pdl, with_input=True, with_loss=True)
    R['preds_shuffled'] = learn.get_preds(dl=DataLoader(TensorDataset(xb, yb), batch_size=16, shuffle=True))
    R['validate'] = learn.validate(dl=pdl)
R['weights'] = {k: v.clone() for k,v in learn.model.state_dict().items()}
R['restored'] = (type(learn.model).__name__, learn.dls is dls, sorted(type(c).__name__ for c in learn.cbs))

# (c) early stopping on a metric that only rank 1 sees getting worse: both processes stop after epoch 1
def sig(pred, targ): return torch.tensor(float(learn.epoch if rank == 1 else -learn.epoch))
learn = mk(metrics=sig)
with learn.distrib_ctx(): learn.fit(6, cbs=EarlyStoppingCallback(monitor='sig', comp=lambda a,b: a < b, patience=1))
R['early_stop_epochs'] = len(learn.recorder.values)

# stops raised on one process only: a CancelFitException (rank 0), a NaN loss (rank 1)
def stop0(self):
    if rank == 0 and self.learn.iter == 3: raise CancelFitException()
learn = mk()
with learn.distrib_ctx(): learn.fit(2, cbs=Callback(before_batch=stop0))
R['cancel_fit_iter'] = learn.train_iter
class NanOnRank1(nn.Module):
    def forward(self, p, t):
        l = nn.functional.cross_entropy(p, t)
        return l*float('nan') if rank == 1 and learn.training and learn.iter == 2 else l
learn = mk(); learn.loss_func = NanOnRank1()
with learn.distrib_ctx(): learn.fit(2, cbs=TerminateOnNaNCallback())
R['nan_iter'] = learn.train_iter

# files on rank 0 only; every process ends with rank 0's (best) weights
learn = mk(metrics=acc, shuffle=True); learn.path = out/f'files{rank}'
with learn.distrib_ctx(): learn.fit(3, lr=0.5, cbs=[SaveModelCallback(fname='best'), CSVLogger()])
R['files'] = sorted(str(p.relative_to(learn.path)) for p in learn.path.rglob('*') if p.is_file())
R['best_weights'] = {k: v.clone() for k,v in learn.model.state_dict().items()}

# resume from a checkpoint (written by rank 0) after a stop mid-epoch 1: same weights as an uninterrupted fit
learn = mk(shuffle=True)
with learn.distrib_ctx(): learn.fit(2)
R['uninterrupted'] = {k: v.clone() for k,v in learn.model.state_dict().items()}
def stop13(self):
    if self.learn.train_iter == 13: raise CancelFitException()
learn = mk(shuffle=True)
with learn.distrib_ctx():
    learn.fit(2, cbs=[CheckpointCallback(every_n_iters=3, every_epoch=False, path=out/'ckpt', keep=None), Callback(before_batch=stop13)])
learn = mk(shuffle=True)
with learn.distrib_ctx(): learn.fit(2, resume=out/'ckpt')
R['resumed'] = {k: v.clone() for k,v in learn.model.state_dict().items()}

# profiling inside distrib_ctx: after the profiler stops, training is still DDP and still syncs the gradients
learn = mk(shuffle=True)
seen = set()
def spy(self):
    if self.learn.training: seen.add((self.learn.epoch, self.learn.n_epoch, type(self.learn.model).__name__))
def snap(self): R['prof_weights'] = {k: v.clone() for k,v in self.learn.model.state_dict().items()}  # before after_fit
with learn.distrib_ctx():
    with learn.profile_callbacks(show=False) as prof: learn.fit(1, cbs=Callback(before_batch=spy))
    R['prof_rows'] = len(prof.stats())
    learn.fit(2, cbs=[Callback(before_batch=spy), Callback(after_train=snap)])
R['prof_seen'] = seen

# streams sharded by rank, of unequal lengths (batch 8): a ShardedStream of 65 items without a length (rank 0: 5
# batches, rank 1: 4) and a stream that yields each process its own part (rank 0: 5 batches, rank 1: 3); every process
# stops when the first runs out. The weights are snapshot at the end of the last training phase (before after_fit gives
# every process rank 0's weights)
from torch.utils.data import IterableDataset
from fastcb.shard import ShardedStream
class Stream(IterableDataset):
    def __init__(self, n): self.n = n
    def __iter__(self): return ((x[i], y[i]) for i in range(self.n))
class OwnPart(IterableDataset):
    sharded_by_rank = True
    def __iter__(self): return ((x[i], y[i]) for i in range(rank, 80 if rank == 0 else 48, 2))
def stream_fit(ds, **kw):
    learn = Learner(DataLoaders(DataLoader(ds, batch_size=8), DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16)),
                    model(), loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1)
    res = dict(iters=[], seen=[0, 0])
    def count(self):
        if self.learn.training: res['seen'][self.learn.epoch] += 1
    def snap(self): res['snap'] = {k: v.clone() for k,v in self.learn.model.state_dict().items()}
    cbs = [Callback(before_batch=count), Callback(after_train=snap),
           Callback(after_epoch=lambda self: res['iters'].append(self.learn.train_iter))]
    with learn.distrib_ctx(timeout=60):
        learn.fit(2, cbs=cbs)
        sdl = DataLoader(ShardedStream(Stream(37)), batch_size=16)
        if kw.get('evaluate'): res['validate'],res['preds'] = learn.validate(dl=sdl),learn.get_preds(dl=sdl)
    res['values'] = learn.recorder.values
    return res
R['stream'] = stream_fit(ShardedStream(Stream(65)), evaluate=True)
R['own_part'] = stream_fit(OwnPart())

# bad input: more processes than training items; a model that differs across processes; a stream that does not say
# how it is split
def error_of(f):
    try: f()
    except Exception as e: return f'{type(e).__name__}: {e}'
def tiny():
    learn = Learner(DataLoaders(DataLoader(TensorDataset(x[:1], y[:1]))), model(), loss_func=nn.CrossEntropyLoss())
    with learn.distrib_ctx(): learn.fit(1)
R['err_world_size'] = error_of(tiny)
def mismatch():
    learn = mk(hidden=16 if rank == 0 else 17)
    with learn.distrib_ctx(): learn.fit(1)
R['err_mismatch'] = error_of(mismatch)
R['err_stream'] = error_of(lambda: stream_fit(Stream(64)))

# a token classifier on text padded per batch: the processes' outputs differ in length and are padded when gathered
from common import tokens, token_collate, TokenModel, token_loss
tdl = DataLoader(tokens(), batch_size=4, collate_fn=token_collate)
learn = Learner(DataLoaders(tdl, tdl), TokenModel(), loss_func=token_loss)
with learn.distrib_ctx():
    R['ragged'] = learn.get_preds(dl=tdl)
    R['ragged_valid'] = learn.validate(dl=tdl)
    R['err_ragged'] = error_of(lambda: learn.get_preds(dl=tdl, pad_value=False))
torch.save(R, out/f'rank{rank}.pt')
'''

CRASH = '''
import os, sys, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fastcb.core import Callback
from fastcb.learner import Learner, DataLoaders
from fastcb.distributed import rank_distrib
from common import data, model
x,y = data(256)
def boom(self):
    if rank_distrib() == 1 and self.learn.iter == 3: raise RuntimeError('boom on rank 1')
dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(TensorDataset(x, y), batch_size=16))
learn = Learner(dls, model(), loss_func=nn.CrossEntropyLoss(), cbs=Callback(before_batch=boom))
with learn.distrib_ctx(): learn.fit(3)
'''


def torchrun(script, folder, timeout=JOB_TIMEOUT, args=()):
    "Run `script` (source) under `torchrun --standalone --nproc_per_node 2` (and `args`); (returncode, output, seconds)"
    folder = Path(folder)
    (folder/'common.py').write_text(COMMON)
    (folder/'job.py').write_text(textwrap.dedent(script))
    exe = Path(sys.executable).parent/'torchrun'
    cmd = [str(exe)] if exe.exists() else [sys.executable, '-m', 'torch.distributed.run']
    cmd += ['--standalone', '--nproc_per_node', '2', *args, str(folder/'job.py'), str(folder)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])}
    env.pop('RANK', None); env.pop('WORLD_SIZE', None)
    t0 = time.monotonic()
    with process_tree(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as p:
        try: output,_ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(p)  # torchrun and its workers (each in a session of its own)
            output,_ = p.communicate(timeout=30)
            pytest.fail(f"torchrun job still running after {timeout}s (a hang?); its output:\n{output[-4000:]}")
    return p.returncode, output, time.monotonic() - t0


@pytest.fixture(scope='module')
def job(tmp_path_factory):
    "The results of the main 2-process job, one dict per rank"
    folder = tmp_path_factory.mktemp('ddp')
    rc, output, _ = torchrun(MAIN, folder)
    assert rc == 0, output[-6000:]
    return [torch.load(folder/f'rank{r}.pt', weights_only=False) for r in range(2)], folder


def _single(bs=16, **kw):
    "The single-process learner the torchrun job's learners are compared with"
    ns = {}
    exec(COMMON, ns)
    x, y = ns['data'](256)
    from fastcb.learner import Learner, DataLoaders
    import fastcb.preds  # noqa: F401
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=bs), DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16),
                      device='cpu')
    return Learner(dls, ns['model'](), loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1,
                   metrics=ns['acc'], **kw), ns


def test_two_processes_batch_16_same_weights_as_one_batch_32(job):
    res, _ = job
    assert [r['ranks'] for r in res] == [(0, 2), (1, 2)]
    learn, _ = _single(bs=32)
    learn.fit(1)
    for r in res:
        for k, v in learn.model.state_dict().items(): torch.testing.assert_close(r['weights'][k], v, atol=1e-5, rtol=0)
        # the epoch's losses and metrics: reduced as sums and counts, the same on every process
        torch.testing.assert_close(torch.tensor(r['values']), torch.tensor(learn.recorder.values), atol=1e-5, rtol=0)
    assert res[0]['restored'][:2] == ('Sequential', True)  # the model unwrapped, the loaders given back
    assert 'DistributedCallback' not in res[0]['restored'][2]


def test_get_preds_exact_across_processes(job):
    res, _ = job
    learn, ns = _single()
    learn.model.load_state_dict(res[0]['weights'])
    xb, yb = ns['data'](37, seed=5)
    pdl = DataLoader(TensorDataset(xb, yb), batch_size=16)
    p, t = learn.get_preds(dl=pdl)
    inp, p2, t2, losses = learn.get_preds(dl=pdl, with_input=True, with_loss=True)
    v = learn.validate(dl=pdl)
    for r in res:
        rp, rt = r['preds']
        assert rp.shape == (37, 3) and torch.equal(rt, yb)  # every item exactly once, in dataset order: no padding
        torch.testing.assert_close(rp, p, atol=1e-5, rtol=0)
        ri, rp2, rt2, rl = r['preds_all']
        assert torch.equal(ri, xb) and torch.equal(rt2, t2)
        torch.testing.assert_close(rl, losses, atol=1e-5, rtol=0)
        sp, st = r['preds_shuffled']
        assert torch.equal(st, yb)
        torch.testing.assert_close(sp, p, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(r['validate']), torch.tensor(v), atol=1e-5, rtol=0)


def test_early_stopping_seen_on_one_rank_stops_both(job):
    res, _ = job
    assert [r['early_stop_epochs'] for r in res] == [2, 2]  # of 6: rank 1's metric got worse at epoch 1


def test_stops_raised_on_one_rank_are_agreed(job):
    res, _ = job
    assert [r['cancel_fit_iter'] for r in res] == [3, 3]  # CancelFitException on rank 0 before batch 3
    assert [r['nan_iter'] for r in res] == [2, 2]  # NaN loss on rank 1 in batch 2: TerminateOnNaN stops both


def test_rank0_only_files_and_same_final_weights(job):
    res, _ = job
    assert res[0]['files'] == ['history.csv', 'models/best.pth'] and res[1]['files'] == []
    for k, v in res[0]['best_weights'].items(): assert torch.equal(res[1]['best_weights'][k], v)


def test_resume_from_checkpoint_under_ddp(job):
    res, folder = job
    assert len(list((folder/'ckpt').glob('checkpoint_*.pth'))) == 4  # written once (by rank 0), every 3 batches
    for r in res:
        for k, v in r['uninterrupted'].items(): assert torch.equal(r['resumed'][k], v)


def test_bad_input_errors(job):
    res, _ = job
    for r in res:
        assert 'training set has 1 item(s) but there are 2 processes' in r['err_world_size']
        assert "parameter '0.weight' has shape (16, 8) on rank 0 but (17, 8) on rank 1" in r['err_mismatch']
        assert r['err_stream'].startswith("TypeError: distrib_ctx cannot shard the training loader: its dataset is a "
                                          "stream"), r['err_stream']
        assert 'wrap it in ShardedStream(ds)' in r['err_stream'] and 'sharded_by_rank = True' in r['err_stream']


def test_streams_of_unequal_lengths_stop_together(job):
    res, _ = job
    for r in res:
        assert r['stream']['iters'] == [4, 8] and r['stream']['seen'] == [4, 4]  # rank 0's 5th batch is left out
        assert r['own_part']['iters'] == [3, 6] and r['own_part']['seen'] == [3, 3]
        assert r['stream']['values'] == res[0]['stream']['values']
    for name in ('stream', 'own_part'):  # every step was a DDP step of both processes
        for k, v in res[0][name]['snap'].items(): assert torch.equal(res[1][name]['snap'][k], v), (name, k)
    # 2 processes x batch 8 over items i % 2 == rank: the batches of one process over the first 64 items, batch 16
    learn, ns = _single(bs=16)
    x, y = ns['data'](256)
    learn.dls = type(learn.dls)(DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16), learn.dls.valid, device='cpu')
    learn.metrics = []
    learn.fit(2)
    for k, v in learn.model.state_dict().items():
        torch.testing.assert_close(res[0]['stream']['snap'][k], v, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(res[0]['stream']['values']), torch.tensor(learn.recorder.values),
                               atol=1e-5, rtol=0)
    # evaluation over a ShardedStream: every process reads it whole, the single-process result
    xb, yb = x[:37], y[:37]
    p, t = learn.get_preds(dl=DataLoader(TensorDataset(xb, yb), batch_size=16))
    for r in res:
        rp, rt = r['stream']['preds']
        assert torch.equal(rt, yb)
        torch.testing.assert_close(rp, p, atol=1e-5, rtol=0)


def test_crash_on_one_rank_ends_the_job(tmp_path):
    rc, output, secs = torchrun(CRASH, tmp_path, timeout=120)
    assert rc != 0
    assert 'RuntimeError: boom on rank 1' in output
    assert 'ChildFailedError' in output  # torchrun stopped the other process and reported the failure
    # the failing process says where the others were; rank 0, released at once, names rank 1's error (printed unless
    # torchrun stops it first)
    assert 'fastcb.distrib_ctx: rank 1 failed here, the other processes did not:' in output
    assert "rank 0: fit, epoch 0, training iter 3 of 8 (" in output
    assert secs < 60, secs


def test_profiling_inside_distrib_ctx_keeps_ddp(job):
    res, _ = job
    for r in res:
        assert r['prof_rows'] > 0  # the profiler timed the callbacks of the first fit
        assert r['prof_seen'] == {(0, 1, '_DDP'), (0, 2, '_DDP'), (1, 2, '_DDP')}  # DDP in both fits
    # the weights at the end of the last training phase (before after_fit gives every rank rank 0's weights): the
    # ranks trained on different shards, so they are equal only if DDP synced the gradients
    for k, v in res[0]['prof_weights'].items(): assert torch.equal(res[1]['prof_weights'][k], v)


def test_ragged_outputs_padded_across_processes(job):
    "Outputs whose length differs between the processes are padded (NaN, -100), as in one process, in dataset order"
    res, _ = job
    ns = {}
    exec(COMMON, ns)
    from fastcb.learner import Learner, DataLoaders
    tdl = DataLoader(ns['tokens'](), batch_size=4, collate_fn=ns['token_collate'])
    learn = Learner(DataLoaders(tdl, tdl, device='cpu'), ns['TokenModel'](), loss_func=ns['token_loss'])
    p, t = learn.get_preds(dl=tdl)
    assert t.shape == (19, 9) and p.shape == (19, 9, 3)
    for r in res:
        rp, rt = r['ragged']
        assert torch.equal(rt, t)  # targets: -100 beyond each sequence, whichever process padded them
        real = t != -100
        torch.testing.assert_close(rp[real], p[real], atol=1e-5, rtol=0)
        assert torch.isfinite(torch.tensor(r['ragged_valid'])).all()
        assert 'pass pad_value=None (or a number) to pad them' in r['err_ragged'], r['err_ragged']
