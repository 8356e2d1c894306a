"""Crash-safe writes: a process killed with SIGKILL in the middle of writing a checkpoint (or `learn.save`) leaves the
previous file intact and loadable, and a training resumes from it."""
import errno, os, re, select, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fastcb.core import *
from fastcb.learner import *
from fastcb.checkpoint import CheckpointCallback, checkpoint_files

TIMEOUT = 120
LIMIT = 3*TIMEOUT  # seconds per test


COMMON = textwrap.dedent('''
    import io, os, sys, time
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from fastcb.core import *
    from fastcb.learner import *
    from fastcb.checkpoint import CheckpointCallback
    torch.set_num_threads(1)
    real_save,n_saves = torch.save,[0]
    def slow_save(obj, f, *args, **kwargs):
        "From the `slow_from`-th call on, write half the bytes, then hang (the test kills us during the write)"
        n_saves[0] += 1
        if n_saves[0] < slow_from: return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO(); real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[:len(data)//2]); f.flush(); os.fsync(f.fileno())
        print('WRITING', os.path.realpath(f'/proc/self/fd/{f.fileno()}') if os.path.exists('/proc/self/fd') else '?', flush=True)
        time.sleep(600)
    torch.save = slow_save
    def mk_learner(path):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g); y = x.sum(1, keepdim=True)
        dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True),
                          DataLoader(TensorDataset(x, y), batch_size=16), device='cpu')
        torch.manual_seed(0)
        learn = Learner(dls, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), loss_func=nn.MSELoss(), path=path)
        learn.logger = lambda row: None
        return learn
''')

CKPT = COMMON + textwrap.dedent('''
    folder,slow_from = sys.argv[1],int(sys.argv[2])
    mk_learner(folder).fit(3, cbs=CheckpointCallback(every_n_iters=2, path='ckpt', keep=2))
''')

SAVE = COMMON + textwrap.dedent('''
    folder,slow_from = sys.argv[1],2
    learn = mk_learner(folder)
    learn.fit(1)
    learn.save('model')                                     # the good file
    real_save({k: v.clone() for k,v in learn.model.state_dict().items()}, os.path.join(folder, 'expected.pt'))
    learn.fit(1)
    learn.save('model')                                     # killed while overwriting it
''')

def run_until_writing(script, *args):
    "Start `script`, wait until it is in the middle of a slow write, SIGKILL it; returns the name of the file being written"
    p = subprocess.Popen([sys.executable, '-c', script, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline,line = time.time() + TIMEOUT,''
        while time.time() < deadline and 'WRITING' not in line:
            r,_,_ = select.select([p.stdout], [], [], 1)
            if r: line = p.stdout.readline()
            if not line and p.poll() is not None: pytest.fail(f"the script ended without a slow write: {p.stderr.read()}")
        assert 'WRITING' in line, 'timed out'
        time.sleep(0.2)
        p.send_signal(signal.SIGKILL)
        assert p.wait(timeout=30) == -signal.SIGKILL
        return line.split('WRITING ', 1)[1].strip()
    finally:
        if p.poll() is None: p.kill(); p.wait()

def test_kill_during_checkpoint_write(tmp_path):
    writing = Path(run_until_writing(CKPT, tmp_path, 5))    # 4 checkpoints written, killed while writing the 5th
    folder = tmp_path/'ckpt'
    assert writing.parent == folder and writing.name.startswith('.') and writing.name.endswith('.tmp'), writing
    assert writing.exists() and writing.stat().st_size > 0  # the half-written temporary file
    files = checkpoint_files(folder)
    names = [re.sub(r'_[0-9a-f]{12}_', '_<run>_', f.name) for f in files]  # the run's tag
    assert names == ['checkpoint_000003_<run>_epoch0_iter6.pth', 'checkpoint_000004_<run>_epoch0_iter8.pth'], files
    for f in files:                                         # intact and loadable, safely
        sd = torch.load(f, weights_only=True)
        assert sd['format'] == 'fastcb.checkpoint'
    # a new training resumes from the latest complete checkpoint, ignoring the temporary file
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g); y = x.sum(1, keepdim=True)
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), DataLoader(TensorDataset(x, y), batch_size=16), device='cpu')
    learn = Learner(dls, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), loss_func=nn.MSELoss(), path=tmp_path)
    learn.logger = lambda row: None
    cb = CheckpointCallback(every_n_iters=2, path='ckpt', keep=2)
    learn.fit(3, cbs=cb, resume='latest')
    assert learn.train_iter == 24 and len(learn.recorder.values) == 3
    assert len(learn.recorder.losses) == 24                 # 8 restored from the checkpoint + 16 trained after it
    assert writing.exists() and not checkpoint_files(folder)[-1].name.startswith('.')
    # the killed process's temporary file is deleted by a write in that folder once it is a minute old (a live
    # process's write, on this machine or another sharing the folder, is never cut short)
    os.utime(writing, (time.time() - 120,)*2)
    learn.fit(1, cbs=CheckpointCallback(every_n_iters=100, path='ckpt'))
    assert not writing.exists(), list(folder.iterdir())
    assert not [p for p in folder.iterdir() if p.name.startswith('.')]

def test_kill_during_learn_save(tmp_path):
    writing = Path(run_until_writing(SAVE, tmp_path))
    model_file = tmp_path/'models'/'model.pth'
    assert writing.parent == model_file.parent and writing.name.endswith('.tmp')
    sd = torch.load(model_file, weights_only=True)         # the previous save, intact
    expected = torch.load(tmp_path/'expected.pt', weights_only=True)
    assert sd.keys() == {'model', 'opt', 'opt_info'}
    assert all(torch.equal(sd['model'][k], v) for k,v in expected.items())
    learn = Learner(DataLoaders(DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 1)), batch_size=4), device='cpu'),
                    nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), loss_func=nn.MSELoss(), path=tmp_path)
    learn.load('model')
    assert all(torch.equal(learn.model.state_dict()[k], v) for k,v in expected.items())

def test_full_disk(tmp_path, monkeypatch):
    "A full disk during a save is an OSError with errno ENOSPC naming the file; the previous file stays intact"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    learn = Learner(DataLoaders(DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8), device='cpu'),
                    nn.Linear(4, 1), loss_func=nn.MSELoss(), path=tmp_path)
    learn.logger = lambda row: None
    learn.fit(1)
    good = learn.save('model').read_bytes()
    real = os.fdopen
    class FullDisk:
        "A file whose writes fail with ENOSPC after 1000 bytes, as on a full disk"
        def __init__(self, f): self.f,self.n = f,0
        def write(self, b):
            self.n += len(b)
            if self.n > 1000: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)
        def __getattr__(self, k): return getattr(self.f, k)
        def __enter__(self): return self
        def __exit__(self, *a): self.f.close()
    monkeypatch.setattr(os, 'fdopen', lambda fd, mode: FullDisk(real(fd, mode)))
    learn.fit(1)
    with pytest.raises(OSError) as e: learn.save('model')
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path/'models'/'model.pth'), e.value
    assert 'No space left on device' in str(e.value) and 'model.pth' in str(e.value)
    with pytest.raises(OSError) as e: learn.fit(1, cbs=CheckpointCallback(path='ck'))
    assert e.value.errno == errno.ENOSPC and 'ck/checkpoint_' in str(e.value)
    monkeypatch.undo()
    assert (tmp_path/'models'/'model.pth').read_bytes() == good
    assert sorted(p.name for p in (tmp_path/'models').iterdir()) == ['model.pth']   # no temporary file left
