"""Speed guards that timings cannot give (timings are never asserted; see bench/ for them):
(a) the default callbacks make no host-device sync during the batches of a fit: every Python-level way of reading a
tensor's value on the host (`.item()`, `.cpu()`, `.tolist()`, `bool(t)`, `float(t)`...) is counted while a batch runs;
on a CUDA machine, torch's own sync detector checks the same (`torch.cuda.set_sync_debug_mode('error')`);
(b) `import fastcb.all` (and each fastcb module) imports only torch, fastcore and the standard library: no matplotlib,
pandas, scikit-learn, scipy, nor a progress-bar or notebook library; nor the parts of torch that only FSDP and sharded
state need (`torch.distributed.tensor`, DCP, and sympy with them: about 700 modules and 1.5 s);
(c) the default callbacks add no device op (an ATen op that is not a view: a kernel launch on a GPU) per training or
validation batch to a hand-written loop on the same model and batches, counted with a `TorchDispatchMode` on CPU."""
import collections, copy, json, math, subprocess, sys, traceback
from pathlib import Path
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import fastcb.all  # noqa: F401  (what users import: its modules may add default callbacks)
from fastcb.core import TrainEvalCallback
from fastcb.learner import Learner, DataLoaders, Recorder, defaults

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------ (a) host-device syncs
# Tensor methods that copy a value to the host (a sync when the tensor is on a GPU), and torch functions that return a
# Python bool computed from tensor data.
_METHODS = ['item', 'cpu', 'tolist', 'numpy', '__array__', '__bool__', '__float__', '__int__', '__index__',
            '__complex__', '__format__', '__repr__', 'equal', 'allclose', 'nonzero', 'is_nonzero']
_FUNCS = ['equal', 'allclose', 'is_nonzero']

class SyncCounter:
    "Counts (and remembers where) the host reads of tensor values made while `on`"
    def __init__(self): self.on,self.calls = False,[]
    def wrap(self, name, f):
        def counted(*args, **kwargs):
            if not self.on: return f(*args, **kwargs)
            self.calls.append((name, ''.join(traceback.format_stack(limit=8)[:-1])))
            self.on = False  # count one read once (`__format__` calls `item`)
            try: return f(*args, **kwargs)
            finally: self.on = True
        return counted
    def report(self):
        return '\n'.join(f"--- {n} called from:\n{where}" for n,where in self.calls[:5])

@pytest.fixture
def syncs(monkeypatch):
    c = SyncCounter()
    for n in _METHODS:
        if hasattr(torch.Tensor, n): monkeypatch.setattr(torch.Tensor, n, c.wrap(f'Tensor.{n}', getattr(torch.Tensor, n)))
    _to = torch.Tensor.to
    def to(self, *args, **kwargs):  # a copy to the host from another device
        if c.on and self.device.type != 'cpu':
            dev = kwargs.get('device', args[0] if args else None)
            if isinstance(dev, (str, torch.device)) and torch.device(dev).type == 'cpu': c.calls.append(('Tensor.to(cpu)', ''))
        return _to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, 'to', to)
    for n in _FUNCS: monkeypatch.setattr(torch, n, c.wrap(f'torch.{n}', getattr(torch, n)))
    return c

def _dls(device='cpu', n=96, bs=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g); y = torch.randint(0, 3, (n,), generator=g)
    x,y = x.to(device),y.to(device)
    return DataLoaders(DataLoader(TensorDataset(x, y), batch_size=bs), DataLoader(TensorDataset(x[:32], y[:32]), batch_size=bs),
                       device=device)

def accuracy(pred, y): return (pred.argmax(-1) == y).float().mean()

def _watch_batches(learn, counter, phase='train'):
    "Count only inside `one_batch` (moving the batch, all batch events, backward, step) of the training (or validation) phase"
    one_batch = type(learn).one_batch
    def watched(i, b):
        counter.on = learn.training == (phase == 'train')
        try: return one_batch(learn, i, b)
        finally: counter.on = False
    learn.one_batch = watched
    return learn

def _quiet_progress(learn):
    "A progress bar (when fastcb.progress is loaded) that never redraws within an epoch: it is allowed to read the loss when it redraws"
    for cb in learn.cbs:
        if type(cb).__name__ == 'ProgressCallback': cb.refresh = cb.plain_every = math.inf
    return learn

def _learner(device='cpu', **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    # SGD: torch's CPU Adam reads its step counter with `.item()` (a CPU tensor, not a sync, but it would be counted)
    learn = Learner(_dls(device), model, nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1, **kwargs)
    return _quiet_progress(learn)

def test_default_callbacks_no_sync_in_training_batches(syncs):
    learn = _watch_batches(_learner(), syncs)
    assert {TrainEvalCallback, Recorder} <= set(defaults.callbacks)
    with learn.no_logging(): learn.fit(2)
    assert len(learn.recorder.losses) == 12  # 6 training batches per epoch did run
    assert not syncs.calls, f"{len(syncs.calls)} host-device syncs during the training batches:\n{syncs.report()}"

def test_default_callbacks_no_sync_in_validation_batches(syncs):
    learn = _watch_batches(_learner(metrics=accuracy), syncs, phase='valid')
    with learn.no_logging(): learn.fit(1); learn.validate()
    assert not syncs.calls, f"{len(syncs.calls)} host-device syncs during the validation batches:\n{syncs.report()}"

def test_train_metrics_no_sync(syncs):
    learn = _watch_batches(_learner(default_cbs=False, metrics=accuracy, cbs=[TrainEvalCallback, Recorder(train_metrics=True)]), syncs)
    with learn.no_logging(): learn.fit(1)
    assert 'train_accuracy' in learn.recorder.metric_names
    assert not syncs.calls, f"{len(syncs.calls)} host-device syncs during the training batches:\n{syncs.report()}"

def test_counter_sees_syncs(syncs):
    "The guard itself: a callback that reads the loss at every batch is caught, once per batch"
    from fastcb.core import Callback
    learn = _watch_batches(_learner(cbs=Callback(after_batch=lambda self: self.learn.loss.item())), syncs)
    with learn.no_logging(): learn.fit(1)
    assert len(syncs.calls) == 6 and 'after_batch' in syncs.calls[0][1]
    syncs.calls.clear(); syncs.on = True
    bool(torch.tensor(1.)); float(torch.tensor(1.)); f'{torch.tensor(1.):.2f}'; torch.tensor([1.]).tolist()
    syncs.on = False
    assert [n for n,_ in syncs.calls] == ['Tensor.__bool__', 'Tensor.__float__', 'Tensor.__format__', 'Tensor.tolist']

def test_progress_bar_reads_loss_at_most_once_per_refresh(syncs):
    "With the progress bar on, the only reads of the loss are its redraws: at most one per `refresh` seconds"
    pytest.importorskip('fastcb.progress')
    from fastcb.progress import ProgressCallback
    import io, time
    learn = _watch_batches(_learner(default_cbs=False, cbs=[TrainEvalCallback, Recorder(), ProgressCallback(refresh=0.05, mode='tty', file=io.StringIO())]), syncs)
    t0 = time.perf_counter()
    learn.fit(3)
    elapsed = time.perf_counter() - t0
    assert len(syncs.calls) <= elapsed/0.05 + 3, syncs.report()
    assert all('progress' in where for _,where in syncs.calls), syncs.report()

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_no_cuda_sync_in_training_batches():
    "On a GPU, torch itself raises on any synchronizing call while the training batches run"
    learn = _learner('cuda')
    one_batch = type(learn).one_batch
    def checked(i, b):
        if not learn.training: return one_batch(learn, i, b)
        torch.cuda.set_sync_debug_mode('error')
        try: return one_batch(learn, i, b)
        finally: torch.cuda.set_sync_debug_mode('default')
    learn.one_batch = checked
    with learn.no_logging(): learn.fit(2)
    assert len(learn.recorder.losses) == 12

# ------------------------------------------------------------------------------------------- (c) device ops per batch
from conftest import OpCounter

def _op_batches(n=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]

def _raw_ops(model, batches, train=True):
    "Ops per batch of a hand-written loop: `to(device)`, forward, loss, backward, step, zero_grad (eval: forward, loss, sum)"
    model,lf,c = copy.deepcopy(model),nn.CrossEntropyLoss(),OpCounter()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)  # the implementation the learner picks (`fast_impl`)
    model.train(train)
    with c, torch.set_grad_enabled(train):
        total = torch.zeros(())
        for x,y in batches:
            c.start()
            x,y = x.to('cpu'),y.to('cpu')
            loss = lf(model(x), y)
            if train: loss.backward(); opt.step(); opt.zero_grad()
            else: total += loss
            c.on = False
    return c.batches

def _fastcb_ops(model, batches, cbs=None, phase='train'):
    "Ops per training (or validation) batch of `learn.fit(1)` with the default callbacks (progress bar included, quiet)"
    learn = _quiet_progress(Learner(DataLoaders(batches, batches, device='cpu'), copy.deepcopy(model), nn.CrossEntropyLoss(),
                                    opt_func=torch.optim.SGD, lr=0.1, cbs=cbs))
    c = OpCounter()
    one_batch = type(learn).one_batch
    def counted(i, b):
        if learn.training == (phase == 'train'): c.start()
        try: return one_batch(learn, i, b)
        finally: c.on = False
    learn.one_batch = counted
    with c, learn.no_logging(): learn.fit(1)
    assert len(learn.recorder.losses) == len(batches)
    return c.batches

def _extra_ops(raw, fc):
    "Per batch, the ops fastcb runs beyond the raw loop's (a Counter; negative counts dropped)"
    assert len(raw) == len(fc) and all(sum(r.values()) > 5 for r in raw)
    return [f - r for r,f in zip(raw, fc)]

def test_default_callbacks_no_device_op_per_training_batch():
    "`learn.loss` is `loss_grad.detach()` (no copy); the Recorder's averages are computed when read"
    torch.manual_seed(0)
    model,batches = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),_op_batches()
    extra = _extra_ops(_raw_ops(model, batches), _fastcb_ops(model, batches))
    assert all(sum(e.values()) == 0 for e in extra), f"extra ops per training batch: {extra}"

def test_default_callbacks_no_device_op_per_validation_batch():
    torch.manual_seed(0)
    model,batches = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),_op_batches()
    extra = _extra_ops(_raw_ops(model, batches, train=False), _fastcb_ops(model, batches, phase='valid'))
    assert all(sum(e.values()) == 0 for e in extra), f"extra ops per validation batch: {extra}"

def test_op_counter_sees_extra_ops():
    "The guard itself: a callback's two tensor ops per batch show; one on `after_loss` makes `learn.loss` a copy (clone)"
    from fastcb.core import Callback
    torch.manual_seed(0)
    model,batches = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)),_op_batches(3)
    cb = Callback(after_batch=lambda self: (self.learn.loss*2).exp())
    extra = _extra_ops(_raw_ops(model, batches), _fastcb_ops(model, batches, cbs=cb))
    assert [sorted(e.elements()) for e in extra] == [['exp', 'mul']]*3, extra
    cb = Callback(after_loss=lambda self: None)
    extra = _extra_ops(_raw_ops(model, batches), _fastcb_ops(model, batches, cbs=cb))
    assert [sorted(e.elements()) for e in extra] == [['clone']]*3, extra

# ----------------------------------------------------------------------------------------------------- (b) lazy imports
_HEAVY = ['matplotlib', 'pandas', 'sklearn', 'scipy', 'fastprogress', 'tqdm', 'rich', 'IPython', 'ipywidgets',
          'tensorboard', 'torchmetrics', 'PIL', 'wandb', 'mlflow', 'fsspec', 's3fs', 'boto3', 'botocore']

def _imported_after(stmts):
    "For each import statement, run in order in one fresh interpreter: the heavy modules it brought in"
    code = (f"import sys, json\nres = []\nheavy = {_HEAVY!r}\nfor s in {stmts!r}:\n"
            f"    before = {{m for m in heavy if m in sys.modules}}\n    exec(s)\n"
            f"    res.append(sorted({{m for m in heavy if m in sys.modules}} - before))\nprint(json.dumps(res))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(zip(stmts, json.loads(out.stdout.strip().splitlines()[-1])))

def test_import_all_is_lean():
    res = _imported_after(['import torch', 'import fastcb.all'])
    assert res['import fastcb.all'] == [], f"`import fastcb.all` imported {res['import fastcb.all']}: import them lazily"

def test_each_module_is_lean():
    mods = sorted(f"import fastcb.{p.stem}" for p in (ROOT/'fastcb').glob('*.py') if not p.stem.startswith('_'))
    res = _imported_after(['import torch', *mods])
    bad = {k: v for k,v in res.items() if v and k != 'import torch'}
    assert not bad, f"modules that import heavy packages at import time (import them inside the functions): {bad}"

_LAZY_TORCH = ['torch.distributed.tensor', 'torch.distributed.checkpoint', 'torch.distributed.fsdp', 'sympy']

def test_import_all_leaves_sharding_unloaded():
    "`DTensor`, DCP and FSDP (and sympy, which they import) are imported by the functions that use them"
    code = (f"import sys, json, torch\nbefore = set(sys.modules)\nimport fastcb.all\n"
            f"print(json.dumps([m for m in {_LAZY_TORCH!r} if m in sys.modules and m not in before]))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"`import fastcb.all` imported {loaded}: import them inside the functions that need them"
