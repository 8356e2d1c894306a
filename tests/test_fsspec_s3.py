"""Checkpoints and saves on S3, for real: `s3fs` against a local S3-compatible server (moto's, started by these tests;
skipped with a message when it cannot start). `learn.save`/`learn.load` of an `s3://` URL, a checkpointed fit resumed
with `fit(resume='latest')`, a torn object passed over, and a training killed with SIGKILL after a checkpoint, resumed
in a new process, ending with the weights of the uninterrupted training (CPU)."""
import json, os, random, signal, subprocess, sys, textwrap, warnings
import pytest
import torch

TIMEOUT = 120  # seconds per process
LIMIT = 4*TIMEOUT  # seconds per test
BUCKET = 'fastcb-test'
ENV = {'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing', 'AWS_SESSION_TOKEN': 'testing',
       'AWS_DEFAULT_REGION': 'us-east-1'}  # dummy credentials: nothing leaves this machine


@pytest.fixture(scope='module')
def s3():
    "The storage options that reach a local S3 server holding bucket `BUCKET` (also set as fsspec's for 's3')"
    pytest.importorskip('s3fs', reason='s3fs is not installed (pip install s3fs): no S3 file system to test')
    try: from moto.server import ThreadedMotoServer
    except ImportError as e: pytest.skip(f"moto's server is not installed (pip install 'moto[server]'): {e}")
    import fsspec
    old_env = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    try:
        server.start()
        host,port = server.get_host_and_port()
        opts = {'key': 'testing', 'secret': 'testing', 'client_kwargs': {'endpoint_url': f'http://{host}:{port}'}}
        fsspec.filesystem('s3', **opts).mkdir(BUCKET)
    except Exception as e:
        server.stop()
        pytest.skip(f"the local S3 server (moto) could not start or take a bucket: {type(e).__name__}: {e}")
    old_conf = fsspec.config.conf.get('s3')
    fsspec.config.conf['s3'] = opts  # what a URL without storage options uses (learn.save('s3://...'), resume=<URL>)
    try: yield opts
    finally:
        if old_conf is None: fsspec.config.conf.pop('s3', None)
        else: fsspec.config.conf['s3'] = old_conf
        for k,v in old_env.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
        server.stop()


def mk(seed=0):
    "A small learner: 96 items, 12 shuffled batches per epoch"
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from fastcb.learner import Learner, DataLoaders
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 4, generator=g); y = x.sum(1, keepdim=True)
    torch.manual_seed(seed)
    ds = TensorDataset(x, y)
    dls = DataLoaders(DataLoader(ds, batch_size=8, shuffle=True), DataLoader(ds, batch_size=32), device='cpu')
    l = Learner(dls, nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), loss_func=nn.MSELoss())
    l.logger = lambda row: None
    return l

def weights(l): return [p.detach().clone() for p in l.model.parameters()]
def same(a, b): return len(a) == len(b) and all(torch.equal(x, y) for x,y in zip(a, b))


def test_storage_and_save_load(s3):
    "The storage contract on S3; `learn.save`/`learn.load` of a URL and with a URL `model_dir`"
    from fastcb.checkpoint import FsspecStorage, storage_for
    st = storage_for(f's3://{BUCKET}/contract', **s3)
    assert isinstance(st, FsspecStorage)
    st.save({'w': torch.ones(2)}, 'a.pth'); st.save([1, 2], 'sub/b.pth')
    assert torch.equal(st.load('a.pth')['w'], torch.ones(2))
    assert (sorted(st.list()), st.list('sub'), st.list('a.pth')) == (['a.pth', 'sub'], ['b.pth'], [])
    assert st.exists('sub') and st.exists('sub/b.pth') and not st.exists('c.pth') and st.size('sub/b.pth') > 0
    assert st.modified('sub') is not None and st.uri('a.pth') == f's3://{BUCKET}/contract/a.pth'
    st.remove('sub'); st.remove('gone.pth')
    assert st.list() == ['a.pth']
    with pytest.raises(FileNotFoundError, match='c.pth'): st.load('c.pth')
    l = mk(); l.fit(1)
    assert l.save(f's3://{BUCKET}/models/m') == f's3://{BUCKET}/models/m.pth'
    l2 = mk(seed=1); l2.load(f's3://{BUCKET}/models/m')
    assert same(weights(l2), weights(l)) and len(l2.opt.state) == 4
    l3 = mk(seed=2); l3.model_dir = f's3://{BUCKET}/models'
    assert same(weights(l3.load('m')), weights(l))


class CancelAt:
    "A callback cancelling the fit after training batch `n`"
    def __new__(cls, n):
        from fastcb.core import Callback, CancelFitException
        def after_batch(self):
            if self.train_iter == n: raise CancelFitException()
        return Callback(after_batch=after_batch)

def test_checkpoint_resume(s3):
    "A fit checkpointing to S3, cancelled, resumed with 'latest': the uninterrupted training; a torn object passed over"
    import fsspec
    from fastcb.checkpoint import CheckpointCallback, checkpoint_names
    url = f's3://{BUCKET}/runs/resume'
    ckpt = lambda: CheckpointCallback(every_n_iters=5, path=url, storage_options=s3)
    ref = mk(); ref.fit(2)
    l = mk(); l.fit(2, cbs=[ckpt(), CancelAt(17)])
    names = checkpoint_names(ckpt().storage)
    assert len(names) == 2 and '_epoch1_iter15' in names[-1], names
    fs = fsspec.filesystem('s3', **s3)  # a torn newer object: what a cut, non-atomic write would leave
    torn = names[-1].replace('_000004_', '_000005_').replace('iter15', 'iter16')
    fs.pipe_file(f'{BUCKET}/runs/resume/{torn}', fs.cat_file(f'{BUCKET}/runs/resume/{names[-1]}')[:2000])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        l = mk(seed=1); l.fit(2, cbs=ckpt(), resume='latest')
    assert any(f"resuming from '{names[-1]}'" in str(x.message) for x in w), [str(x.message) for x in w]
    assert same(weights(l), weights(ref)) and l.recorder.values == ref.recorder.values
    last = checkpoint_names(ckpt().storage)[-1]
    assert last.endswith('_final.pth'), last
    l = mk(); l.fit(2, resume=f'{url}/{last}')  # a checkpoint by its URL (fsspec's configuration for s3)
    assert same(weights(l), weights(ref))


SCRIPT = textwrap.dedent('''
    import json, os, signal, sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from fastcb.core import *
    from fastcb.learner import *
    from fastcb.checkpoint import CheckpointCallback
    torch.set_num_threads(1)
    mode,out,url,kill_at,seed = sys.argv[1],sys.argv[2],sys.argv[3],int(sys.argv[4]),int(sys.argv[5])
    opts = json.loads(sys.argv[6])  # the storage options that reach the local S3 server
    g = torch.Generator().manual_seed(0)
    x = torch.randn(312, 6, generator=g); y = (x[:, :3].sum(1) > 0).long()
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=24, shuffle=True), device='cpu')  # 13 batches
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))

    class Kill(Callback):
        order = 200
        def after_batch(self):
            if self.training and self.train_iter == kill_at: os.kill(os.getpid(), signal.SIGKILL)

    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), lr=3e-3)
    learn.logger = lambda row: None
    ckpt = CheckpointCallback(every_n_iters=5, path=url, keep=2, storage_options=opts)
    ckpt.history_min = 8  # the per-batch histories go to side files on S3 too
    if mode == 'ref': learn.fit(3)
    elif mode == 'kill': learn.fit(3, cbs=[ckpt, Kill()])
    else:
        print('RESUMING FROM', ckpt.latest_checkpoint(), flush=True)
        learn.fit(3, cbs=ckpt, resume='latest')
    torch.save({'weights': [p.detach() for p in learn.model.state_dict().values()], 'losses': learn.recorder.losses,
                'train_iter': learn.train_iter}, out)
''')

N_ITER = 13  # training batches per epoch

def run(tmp, s3, url, mode, kill_at=0, seed=0):
    "Run the training script in a new process; returns the process and the file of its results"
    out = tmp/f'{mode}_{kill_at}_{seed}.pth'
    p = subprocess.run([sys.executable, '-c', SCRIPT, mode, str(out), url, str(kill_at), str(seed), json.dumps(s3)],
                       capture_output=True, text=True, timeout=TIMEOUT)
    return p,out

@pytest.mark.slow
def test_sigkill_then_resume_on_s3(tmp_path, s3):
    "Killed (SIGKILL) in epoch 2 after a checkpoint on S3, resumed in another process: the uninterrupted run's weights"
    from fastcb.checkpoint import checkpoint_names, storage_for
    url = f's3://{BUCKET}/runs/killed'
    rng = random.Random(); seed = rng.randrange(10**6); rng.seed(seed)
    kill_at = N_ITER + rng.randrange(3, N_ITER - 1)  # after the checkpoint at train_iter 15
    print(f'kill at training iteration {kill_at} (seed {seed})')
    ref,ref_out = run(tmp_path, s3, url, 'ref')
    assert ref.returncode == 0, ref.stderr
    killed,_ = run(tmp_path, s3, url, 'kill', kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    names = checkpoint_names(storage_for(url, **s3))
    assert len(names) == 2 and '_epoch1_iter' in names[-1], names
    res,res_out = run(tmp_path, s3, url, 'resume', seed=1)
    assert res.returncode == 0, res.stderr
    assert f'{url}/{names[-1]}' in res.stdout, res.stdout
    a,b = torch.load(ref_out, weights_only=True),torch.load(res_out, weights_only=True)
    assert same(a['weights'], b['weights'])
    assert a['losses'] == b['losses'] and a['train_iter'] == b['train_iter'] == 3*N_ITER
