"""The experiment trackers for real: a fit that crashes and a new `Learner`'s `fit(resume='latest')` continue the same
W&B run (offline mode, read back from the run's `.wandb` files) and the same MLflow run (a local file store, read back
through `MlflowClient`), with steps that go on from the checkpoint; a failed fit ends its run as failed; and
`import fastcb.all` imports neither package."""
import json, struct, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fastcb.core import Callback
from fastcb.learner import Learner, DataLoaders
from fastcb.checkpoint import CheckpointCallback

wandb = pytest.importorskip('wandb')
mlflow = pytest.importorskip('mlflow')
from fastcb.loggers import WandbCallback, MLflowCallback  # noqa: E402

N_BATCHES = 12  # per epoch


def _learner(cbs, path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, generator=g); y = (x[:, :3].sum(1) > 0).long()
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1)),
                      DataLoader(TensorDataset(x[:32], y[:32]), batch_size=16), device='cpu')
    torch.manual_seed(0)
    learn = Learner(dls, nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)), loss_func=nn.CrossEntropyLoss(),
                    lr=1e-2, cbs=cbs, path=path)
    learn.logger = lambda row: None
    return learn


class Crash(Callback):
    order,in_run_identity = 200,False  # (it is not part of the run that is resumed)
    def after_batch(self):
        if self.training and self.epoch == 1 and self.iter == 7: raise RuntimeError('crash')


def _crash_then_resume(mk_cb, path):
    "Fit 2 epochs, crashing in the second (step 20); a new Learner resumes from the checkpoint after step 15"
    ck = lambda: CheckpointCallback(every_n_iters=5, path=Path(path)/'ck')
    a = mk_cb()
    with pytest.raises(RuntimeError, match='crash'): _learner([a, ck(), Crash()], path).fit(2)
    b = mk_cb()
    learn = _learner([b, ck()], path)
    learn.fit(2, resume='latest')
    return a, b, learn


# ------------------------------------------------------------------------------------------------------------ W&B
def _wandb_records(run_dir):
    "The records of an offline run's `.wandb` file (W&B's log: 32 KiB blocks of chunked records after a 7-byte header)"
    from wandb.proto import wandb_internal_pb2 as pb
    data = next(Path(run_dir).glob('run-*.wandb')).read_bytes()
    assert data[:4] == b':W&B'
    pos, buf, recs = 7, b'', []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7: pos += 32768 - pos % 32768; continue
        _, n, kind = struct.unpack('<IHB', data[pos:pos + 7]); pos += 7
        if n == 0 and kind == 0: break
        buf += data[pos:pos + n]; pos += n
        if kind in (1, 4): r = pb.Record(); r.ParseFromString(buf); recs.append(r); buf = b''
    return recs


def _wandb_run(run_dir, timeout=30):
    "The id, config, history and exit codes of an offline run, once W&B's service wrote its exit record"
    t0 = time.monotonic()
    while True:  # `run.finish()` returns before the service has written everything
        recs = _wandb_records(run_dir)
        if any(r.WhichOneof('record_type') == 'exit' for r in recs) or time.monotonic() - t0 > timeout: break
        time.sleep(0.1)
    kind = lambda k: [getattr(r, k) for r in recs if r.WhichOneof('record_type') == k]
    key = lambda i: i.key or '/'.join(i.nested_key)
    hist = [{key(i): json.loads(i.value_json) for i in h.item if not key(i).startswith('_')} for h in kind('history')]
    cfg = {i.key: json.loads(i.value_json) for r in kind('run') for i in r.config.update}
    return dict(id=kind('run')[0].run_id, config=cfg, history=hist, exit=[e.exit_code for e in kind('exit')])


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    "Offline runs in `tmp_path` (given as `dir`: W&B reads WANDB_DIR once per process)"
    for k, v in dict(WANDB_MODE='offline', WANDB_DIR=str(tmp_path), WANDB_SILENT='true').items(): monkeypatch.setenv(k, v)
    yield tmp_path
    if wandb.run is not None: wandb.run.finish()


def test_wandb_resume_continues_the_run(wandb_offline, tmp_path):
    a, b, learn = _crash_then_resume(lambda: WandbCallback(log_every=3, project='resume', dir=str(wandb_offline)), tmp_path/'learn')
    runs = [_wandb_run(d) for d in sorted((wandb_offline/'wandb').glob('offline-run-*'))]
    assert len(runs) == 2 and a.run_id == b.run_id == runs[0]['id'] == runs[1]['id']  # one W&B run, two sessions
    assert runs[0]['exit'] == [1] and runs[1]['exit'] == [0]  # the crash ended it as failed, the resume as finished
    steps = lambda r: [h['step'] for h in r['history'] if 'train/smooth_loss' in h]
    assert steps(runs[0]) == [3, 6, 9, 12, 15, 18]  # crashed after step 20
    assert steps(runs[1]) == [18, 21, 24]  # resumed after step 15: from 16 on
    assert [h['epoch'] for h in runs[0]['history'] if 'epoch' in h] == [0]
    assert [(h['step'], h['epoch']) for h in runs[1]['history'] if 'epoch' in h] == [(2*N_BATCHES, 1)]
    assert runs[0]['config']['n_epoch'] == 2 and runs[0]['config']['cbs']['wandb']['log_every'] == 3
    last = [h for h in runs[1]['history'] if h.get('step') == 24 and 'train/smooth_loss' in h][0]
    assert last['train/smooth_loss'] == pytest.approx(float(learn.recorder.losses[-1]), rel=1e-6)


def test_wandb_keeps_an_active_run_open(wandb_offline, tmp_path):
    run = wandb.init(project='mine', dir=str(wandb_offline))
    learn = _learner(WandbCallback(log_every=None), tmp_path)
    learn.fit(1); learn.fit(1)
    assert wandb.run is run and learn.wandb.run_id == run.id and learn.wandb.step == 2*N_BATCHES  # steps go on
    run.finish()
    hist = _wandb_run(next((wandb_offline/'wandb').glob('offline-run-*')))['history']
    assert [(h['step'], h['epoch']) for h in hist if 'epoch' in h] == [(N_BATCHES, 0), (2*N_BATCHES, 0)]


# ------------------------------------------------------------------------------------------------------------ MLflow
@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    monkeypatch.setenv('MLFLOW_ALLOW_FILE_STORE', 'true')  # MLflow 3 refuses the file store otherwise
    return f'file://{tmp_path}/mlruns'


def test_mlflow_resume_continues_the_run(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient
    mk = lambda: MLflowCallback(log_every=3, log_model=True, tracking_uri=mlflow_uri, experiment_name='resume')
    a, b, learn = _crash_then_resume(mk, tmp_path/'learn')
    client = MlflowClient(mlflow_uri)
    assert a.run_id == b.run_id
    runs = client.search_runs([client.get_experiment_by_name('resume').experiment_id])
    assert [r.info.run_id for r in runs] == [a.run_id]  # no second run
    run = client.get_run(a.run_id)
    assert run.info.status == 'FINISHED'
    assert run.data.params['n_epoch'] == '2' and run.data.params['cbs.mlflow.log_every'] == '3'
    steps = sorted(m.step for m in client.get_metric_history(a.run_id, 'train/smooth_loss'))
    assert steps == [3, 6, 9, 12, 15, 18, 18, 21, 24]  # step 18 logged before the crash, and again after the resume
    assert sorted((m.step, m.value) for m in client.get_metric_history(a.run_id, 'epoch')) == [(N_BATCHES, 0), (2*N_BATCHES, 1)]
    assert [x.path for x in client.list_artifacts(a.run_id, 'model')] == ['model/model.pth']


def test_mlflow_failed_fit(mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient
    cb = MLflowCallback(log_every=2, tracking_uri=mlflow_uri)
    with pytest.raises(RuntimeError, match='crash'): _learner([cb, Crash()], tmp_path).fit(2)
    assert MlflowClient(mlflow_uri).get_run(cb.run_id).info.status == 'FAILED'

    class Interrupt(Callback):
        def after_batch(self): raise KeyboardInterrupt
    cb = MLflowCallback(tracking_uri=mlflow_uri)
    with pytest.raises(KeyboardInterrupt): _learner([cb, Interrupt()], tmp_path).fit(1)
    assert MlflowClient(mlflow_uri).get_run(cb.run_id).info.status == 'KILLED'


# ------------------------------------------------------------------------------------------------------------ imports
def test_fastcb_all_imports_no_tracker():
    code = ("import sys, fastcb.all, fastcb.loggers; "
            "print(sorted(m for m in ('wandb', 'mlflow', 'tensorboard', 'fsspec') if m in sys.modules))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'
