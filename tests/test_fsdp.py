"""`distrib_ctx(strategy='fsdp')` with 2 real processes: `torchrun --standalone --nproc_per_node 2` on the CPU (gloo).

One job runs the main scenarios (each process saves what it saw) and the tests compare it with single-process runs made
here; a second job is killed (SIGKILL on one process) in the middle of a fit that writes sharded checkpoints, a third
resumes it. Every job is bounded by a timeout (see `test_distributed.torchrun`).
"""
import os, warnings
from pathlib import Path
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import test_distributed as td

try: from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2: torch 2.6 and newer)
except ImportError: fully_shard = None
pytestmark = pytest.mark.skipif(fully_shard is None or not torch.distributed.is_gloo_available(),
                                reason="this torch has no gloo backend or no FSDP2")

COMMON = td.COMMON + '''
class Block(nn.Module):
    def __init__(self, h):
        super().__init__(); self.lin,self.norm = nn.Linear(h, h),nn.LayerNorm(h)
    def forward(self, x): return self.norm(x + self.lin(x).relu())

def bmodel(hidden=16):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, hidden), Block(hidden), Block(hidden), nn.Linear(hidden, 3))  # no dropout
'''

HEAD = '''
import os, sys, signal, warnings, torch
from pathlib import Path
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fastcb.core import Callback
from fastcb.learner import Learner, DataLoaders
import fastcb.progress, fastcb.preds, fastcb.fsdp
from fastcb.training import GradientClip, GradientAccumulation
from fastcb.tracker import SaveModelCallback
from fastcb.checkpoint import CheckpointCallback
from common import data, bmodel, acc, Block
out,rank = Path(sys.argv[1]),int(os.environ['RANK'])
R = {}
x,y = data(256)
def mk(bs=16, shuffle=False, opt_func=torch.optim.SGD, **kw):
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=shuffle, generator=torch.Generator().manual_seed(3)),
                      DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16))
    return Learner(dls, bmodel(), loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, lr=0.1, path=out, **kw)
sd = lambda m: {k: v.detach().clone() for k,v in m.state_dict().items()}
CKPT = dict(every_n_iters=3, path='ckpt', keep=2)
'''

MAIN = HEAD + '''
# (a) one epoch, 2 processes x 16 = one process's batch of 32; (b) the slices; (c) exact evaluation; (d) saving
learn = mk(metrics=acc)
with learn.distrib_ctx(strategy='fsdp', wrap=Block):
    m = learn.model
    R['kind'] = (type(m).__name__, {type(p).__name__ for p in m.parameters()})
    R['local'],R['total'] = sum(p.to_local().numel() for p in m.parameters()),sum(p.numel() for p in m.parameters())
    learn.fit(1)
    R['values'] = learn.recorder.values
    xb,yb = data(37, seed=5)
    R['preds'] = learn.get_preds(dl=DataLoader(TensorDataset(xb, yb), batch_size=8), with_input=True)
    R['validate'] = learn.validate()
    learn.save('sharded')
    learn.save('full', full=True)
    R['files_full'] = sorted(os.listdir(out/'models'))
    learn.load('full')  # a plain file into the sharded learner
    R['validate_full'] = learn.validate()
    learn.load('sharded')
R['weights'] = sd(learn.model)
R['restored'] = (type(learn.model).__name__, {type(p).__name__ for p in learn.model.parameters()}, learn.opt is not None,
                 sorted(type(c).__name__ for c in learn.cbs))

# (e) 2 epochs with sharded checkpoints, uninterrupted (the killed job resumes them)
learn = mk(shuffle=True, cbs=CheckpointCallback(**CKPT))
with learn.distrib_ctx(strategy='fsdp', wrap=Block): learn.fit(2)
R['uninterrupted'] = sd(learn.model)
R['ckpt_files'] = sorted(os.listdir(out/'ckpt'))

# (f) Adam, gradient clipping and accumulation, the best model saved and reloaded: as one process
learn = mk(opt_func=torch.optim.Adam, metrics=acc,
           cbs=[GradientClip(0.05), GradientAccumulation(64), SaveModelCallback(monitor='acc', fname='best', with_opt=True)])
with learn.distrib_ctx(strategy='fsdp', wrap=Block): learn.fit(3, lr=0.01)
n = learn.get_cb('GradientClip').last_norm
R['adam'] = (learn.recorder.values, sd(learn.model), n.full_tensor() if hasattr(n, 'full_tensor') else n)
R['adam_opt'] = learn.opt.state_dict()

# (g) bfloat16 through MixedPrecision: FSDP's policy (bf16 parameters in the forward, float32 reductions)
learn = mk(metrics=acc)
learn.to_bf16()
with learn.distrib_ctx(strategy='fsdp', wrap=Block):
    learn.fit(1)
    R['bf16_dtype'] = learn.model[1]._get_fsdp_state()._mp_policy.param_dtype
R['bf16'] = (learn.recorder.values, sd(learn.model))

# (h) a wrap policy that selects nothing: a warning, the root alone sharded, the same training
learn = mk()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    with learn.distrib_ctx(strategy='fsdp', wrap=nn.Conv2d): learn.fit(1)
R['warn'] = [str(o.message) for o in w if 'wrap policy' in str(o.message)]
R['nowrap'] = sd(learn.model)

# (j) a stop raised on rank 0 only is agreed: both processes stop at the same batch
from fastcb.core import CancelFitException
def stop0(self):
    if rank == 0 and self.learn.iter == 3: raise CancelFitException()
learn = mk()
with learn.distrib_ctx(strategy='fsdp', wrap=Block): learn.fit(2, cbs=Callback(before_batch=stop0))
R['stopped_at'] = learn.train_iter

# (k) an error on every process leaves the context: the learner gets its plain model back (its weights from the entry)
def boom(self):
    if self.learn.iter == 2: raise ValueError('boom')
learn = mk()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    try:
        with learn.distrib_ctx(strategy='fsdp', wrap=Block): learn.fit(1, cbs=Callback(before_batch=boom))
    except ValueError as e: R['boom'] = str(e)
R['after_error'] = (type(learn.model).__name__, {type(p).__name__ for p in learn.model.parameters()},
                    [str(o.message)[:60] for o in w if 'cannot be gathered' in str(o.message)])
learn.fit(1)  # and it trains in this process

# (i) bad input, on every process: an argument FSDP does not take
try:
    with mk().distrib_ctx(strategy='fsdp', reshard_after_fwd=True): pass
except TypeError as e: R['err_arg'] = str(e)
torch.save(R, out/f'rank{rank}.pt')
'''

KILLED = HEAD + '''
def kill(self):  # epoch 1, batch 5: after the checkpoint of batch 3 (train_iter 11)
    if rank == 1 and self.learn.train_iter == 13: os.kill(os.getpid(), signal.SIGKILL)
learn = mk(shuffle=True, cbs=[CheckpointCallback(**CKPT), Callback(before_batch=kill)])
with learn.distrib_ctx(strategy='fsdp', wrap=Block): learn.fit(2)
'''

RESUME = HEAD + '''
learn = mk(shuffle=True, cbs=CheckpointCallback(**CKPT))
with learn.distrib_ctx(strategy='fsdp', wrap=Block): learn.fit(2, resume='latest')
R['resumed'] = sd(learn.model)
torch.save(R, out/f'resumed{rank}.pt')
'''


def torchrun(script, folder, timeout=td.JOB_TIMEOUT):
    "`test_distributed.torchrun` with this module's common code"
    old, td.COMMON = td.COMMON, COMMON
    try: return td.torchrun(script, folder, timeout)
    finally: td.COMMON = old


@pytest.fixture(scope='module')
def job(tmp_path_factory):
    "The results of the main job, one dict per rank, and its folder"
    folder = tmp_path_factory.mktemp('fsdp')
    rc, output, _ = torchrun(MAIN, folder)
    assert rc == 0, output[-6000:]
    return [torch.load(folder/f'rank{r}.pt', weights_only=False) for r in range(2)], folder


def _shards(pth):
    "The shards folder of sharded file `pth`: the one folder named after it"
    found = [p for p in pth.parent.iterdir() if p.is_dir() and p.name.startswith(pth.stem + '.') and p.name.endswith('.shards')]
    assert len(found) == 1, found
    return found[0]


def _manifest(obj):
    "The manifest of shards in a sharded file's state: the dict whose keys are the names of the shards' files"
    if isinstance(obj, dict):
        if '.metadata' in obj: return obj
        for v in obj.values():
            if (m := _manifest(v)) is not None: return m
    return None


def _ns():
    ns = {}
    exec(COMMON, ns)
    return ns


def _single(bs=32, shuffle=False, opt_func=torch.optim.SGD, **kw):
    "The single-process learner with the global batch of the job's"
    from fastcb.learner import Learner, DataLoaders
    import fastcb.preds  # noqa: F401
    ns = _ns()
    x, y = ns['data'](256)
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=shuffle, generator=torch.Generator().manual_seed(3)), DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16),
                      device='cpu')
    return Learner(dls, ns['bmodel'](), loss_func=nn.CrossEntropyLoss(), opt_func=opt_func, lr=0.1, **kw), ns


def _close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f'{k}: {m}')


def test_sgd_steps_as_one_process(job):
    res, _ = job
    learn, ns = _single(metrics=_ns()['acc'])
    learn.fit(1)
    for r in res:
        _close(r['weights'], learn.model.state_dict())
        torch.testing.assert_close(torch.tensor(r['values']), torch.tensor(learn.recorder.values), atol=1e-5, rtol=0)
    assert res[0]['kind'] == ('FSDPSequential', {'DTensor'})
    # on exit the learner has its own plain model back, with the trained weights and an optimizer over them
    assert res[0]['restored'][:3] == ('Sequential', {'Parameter'}, True)
    assert 'FSDPCallback' not in res[0]['restored'][3]


def test_each_process_holds_about_half(job):
    res, _ = job
    total = res[0]['total']
    assert total == sum(p.numel() for p in _ns()['bmodel']().parameters())
    assert [r['local'] for r in res] and sum(r['local'] for r in res) == total
    for r in res: assert 0.4 * total <= r['local'] <= 0.6 * total, (r['local'], total)


def test_get_preds_and_validate_exact(job):
    res, _ = job
    learn, ns = _single(metrics=ns_acc())
    learn.model.load_state_dict(res[0]['weights'])
    xb, yb = ns['data'](37, seed=5)
    inp, pred, targ = learn.get_preds(dl=DataLoader(TensorDataset(xb, yb), batch_size=8), with_input=True)
    for r in res:
        torch.testing.assert_close(r['preds'][0], inp, atol=0, rtol=0)  # inputs, in dataset order
        torch.testing.assert_close(r['preds'][1], pred, atol=1e-5, rtol=0)
        assert torch.equal(r['preds'][2], targ)
        torch.testing.assert_close(torch.tensor(r['validate']), torch.tensor(learn.validate()), atol=1e-5, rtol=0)
        assert r['validate_full'] == r['validate']  # the plain file loaded into the sharded learner


def test_full_save_loads_in_one_process(job):
    res, folder = job
    fs = res[0]['files_full']
    assert [f for f in fs if not f.endswith('.shards')] == ['full.pth', 'sharded.pth']  # rank 0 wrote the plain file
    assert [f for f in fs if f.endswith('.shards')] == [_shards(folder/'models'/'sharded.pth').name]  # (only sharded's)
    learn, _ = _single()
    learn.load(folder/'models'/'full.pth')
    _close(learn.model.state_dict(), res[0]['weights'], atol=0)
    learn, _ = _single()
    learn.load(folder/'models'/'sharded.pth')  # the 2 processes' shards, resharded into one
    _close(learn.model.state_dict(), res[0]['weights'], atol=0)


def test_clip_accumulation_adam_and_best_model(job):
    res, folder = job
    from fastcb.training import GradientClip, GradientAccumulation
    from fastcb.tracker import SaveModelCallback
    learn, ns = _single(opt_func=torch.optim.Adam, metrics=ns_acc())
    learn.path = folder/'single'
    # `n_acc` counts each process's samples (as under DDP): 64 per process of 16-item batches = 128 of one process's 32
    clip = GradientClip(0.05)
    learn.fit(3, lr=0.01, cbs=[clip, GradientAccumulation(128), SaveModelCallback(monitor='acc', fname='best', with_opt=True)])
    for r in res:
        values, weights, norm = r['adam']
        torch.testing.assert_close(torch.tensor(values), torch.tensor(learn.recorder.values), atol=1e-4, rtol=0)
        _close(weights, learn.model.state_dict(), atol=1e-4)
        torch.testing.assert_close(torch.as_tensor(norm).float(), torch.as_tensor(clip.last_norm).float(), atol=1e-4, rtol=0)
        st = r['adam_opt']['state']
        assert set(st) == set(learn.opt.state_dict()['state']) and 'exp_avg' in st[0]  # the optimizer came back too
    assert (folder/'models'/'best.pth').exists() and _shards(folder/'models'/'best.pth').is_dir()


def ns_acc(): return _ns()['acc']


def test_bf16_maps_to_fsdp_policy(job):
    res, _ = job
    learn, _ = _single(metrics=ns_acc())
    learn.fit(1)
    for r in res:
        assert r['bf16_dtype'] == torch.bfloat16
        values, weights = r['bf16']
        assert all(torch.isfinite(torch.tensor(values)).tolist()[0])
        torch.testing.assert_close(torch.tensor(values), torch.tensor(learn.recorder.values), atol=0.05, rtol=0)
        assert all(v.dtype == torch.float32 for v in weights.values())  # float32 parameters, bf16 only in the passes


def test_policy_selecting_nothing_warns_and_trains(job):
    res, _ = job
    for r in res:
        assert len(r['warn']) == 1 and 'the root alone is sharded' in r['warn'][0]
        _close(r['nowrap'], r['weights'])
        assert 'takes wrap, mp_policy' in r['err_arg']


def test_stops_agreed_and_errors_give_the_model_back(job):
    res, _ = job
    for r in res:
        assert r['stopped_at'] == 3  # rank 1 stopped with rank 0, before its batch 3
        assert r['boom'] == 'boom'
        assert r['after_error'] == ('Sequential', {'Parameter'},
                                    ["distrib_ctx(strategy='fsdp') ended with an error: the traine"])


def test_sharded_checkpoints_rotated(job):
    res, _ = job
    fs = res[0]['ckpt_files']
    assert len(fs) == 4 and sum(f.endswith('.shards') for f in fs) == 2  # keep=2: two files, each with its shards
    assert not any(f.startswith('.') for f in fs)  # no temporary folder left


def test_every_shard_file_checksummed(job, tmp_path):
    "The manifest in a checkpoint names every file of its folder (both processes' shards and the metadata) with its checksum"
    import hashlib, shutil
    _, folder = job
    shutil.copytree(folder/'ckpt', tmp_path/'ckpt')
    last = sorted((tmp_path/'ckpt').glob('*.pth'))[-1]
    man, shards = _manifest(torch.load(last, weights_only=True)), _shards(last)
    assert sorted(man) == sorted(os.listdir(shards)) and {'.metadata', '__0_0.distcp', '__1_0.distcp'} <= set(man)
    for n, r in man.items(): assert r == {'size': (shards/n).stat().st_size, 'sha256': hashlib.sha256((shards/n).read_bytes()).hexdigest()}
    # a flipped bit in rank 1's shard: a resume in one process names it, before anything is loaded
    data = bytearray((shards/'__1_0.distcp').read_bytes()); data[len(data)//2] ^= 4; (shards/'__1_0.distcp').write_bytes(bytes(data))
    learn, _ = _single(shuffle=True)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"__1_0\.distcp' is corrupt"): learn.fit(2, resume=last)
    for k, v in before.items(): assert torch.equal(learn.model.state_dict()[k], v), k


@pytest.mark.slow
def test_kill_and_resume_exact(job, tmp_path):
    res, _ = job
    rc, output, _ = torchrun(KILLED, tmp_path, timeout=180)
    assert rc != 0, output[-3000:]  # rank 1 was killed: torchrun ended the job
    names = sorted(os.listdir(tmp_path/'ckpt'))
    assert any('epoch1_iter12' in n for n in names), names
    rc, output, _ = torchrun(RESUME, tmp_path)
    assert rc == 0, output[-6000:]
    for r in range(2):
        resumed = torch.load(tmp_path/f'resumed{r}.pt', weights_only=False)['resumed']
        for k, v in res[r]['uninterrupted'].items(): assert torch.equal(resumed[k], v), k


def test_sharded_checkpoint_resumes_in_one_process(job, tmp_path):
    "Another world size: the shards are resharded into one process (the data order differs: a warning, not exactness)"
    _, folder = job
    import shutil
    shutil.copytree(folder/'ckpt', tmp_path/'ckpt')
    learn, _ = _single(shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(2, resume=sorted((tmp_path/'ckpt').glob('*_iter*.pth'))[-1])  # mid-epoch 1: batches 6 and 7 remain
    assert learn.train_iter == 16
    # a truncated shard is named, before anything is loaded
    last = sorted((tmp_path/'ckpt').glob('*_iter*.pth'))[-1]
    shard = next(_shards(last).glob('*.distcp'))
    shard.write_bytes(shard.read_bytes()[:10])
    learn, _ = _single(shuffle=True)
    with pytest.raises(ValueError, match='truncated'): learn.fit(2, resume=last)
