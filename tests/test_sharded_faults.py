"""Sharded checkpoints under faults and attacks, read by a plain single-process `Learner`.

One `torchrun` job with a single process (`distrib_ctx(strategy='fsdp')` shards the model over a mesh of one, so its
files are the sharded kind) writes checkpoints during a fit and a `learn.save`; the tests copy them, damage or craft
them, and load them here: a missing shards folder is passed over by `resume='latest'`, a flipped bit is named, and a
crafted `.metadata` or non-tensor item is refused without running (a marker file it would create never appears).
"""
import pickle, shutil
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import test_distributed as td
import test_fsdp as tf

pytestmark = tf.pytestmark

JOB = tf.HEAD + '''
learn = mk(shuffle=True, cbs=CheckpointCallback(every_n_iters=3, path='ckpt'))
with learn.distrib_ctx(strategy='fsdp', wrap=Block):
    R['sharded'] = type(next(learn.model.parameters())).__name__
    learn.fit(2)
    learn.save('m')
torch.save(R, out/'job.pt')
'''


@pytest.fixture(scope='module')
def job(tmp_path_factory):
    "The folder of a one-process FSDP job: its checkpoints (`ckpt/`), a sharded `learn.save` (`models/m.pth`), results"
    folder = tmp_path_factory.mktemp('sharded_faults')
    rc, output, _ = _run(folder)
    assert rc == 0, output[-6000:]
    res = torch.load(folder/'job.pt', weights_only=False)
    assert res['sharded'] == 'DTensor'  # the files are those of a sharded model
    return res, folder


def _run(folder):
    "`tf.torchrun` with one process"
    old, td.COMMON = td.COMMON, tf.COMMON
    try: return td.torchrun(JOB, folder, args=('--nproc_per_node', '1'))
    finally: td.COMMON = old


def _learner(path, shuffle=True):
    "The job's learner, in this process"
    from fastcb.learner import Learner, DataLoaders
    from fastcb.checkpoint import CheckpointCallback
    import fastcb.preds, fastcb.progress  # noqa: F401  (as the job)
    ns = tf._ns()
    x, y = ns['data'](256)
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=16, shuffle=shuffle, generator=torch.Generator().manual_seed(3)),
                      DataLoader(TensorDataset(x[:50], y[:50]), batch_size=16), device='cpu')
    return Learner(dls, ns['bmodel'](), loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.1, path=path,
                   cbs=CheckpointCallback(every_n_iters=3, path='ckpt'))


def _copy(job, tmp_path):
    shutil.copytree(job[1]/'ckpt', tmp_path/'ckpt')
    shutil.copytree(job[1]/'models', tmp_path/'models')
    return tmp_path


def _weights(learn): return {k: v.clone() for k, v in learn.model.state_dict().items()}


class Exploit:
    "Unpickling it creates file `marker`"
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return open, (self.marker, 'w')


def test_missing_shards_folder_passes_over(job, tmp_path):
    "A checkpoint whose shards folder is gone is passed over by resume='latest', as a truncated one is"
    d = _copy(job, tmp_path)
    prev, last = sorted((d/'ckpt').glob('checkpoint_*.pth'))[-2:]
    shutil.rmtree(tf._shards(last))
    learn = _learner(d)
    with pytest.warns(UserWarning, match='resuming from') as w: learn.fit(2, resume='latest')
    msg = next(str(o.message) for o in w if 'resuming from' in str(o.message))
    assert f"resuming from '{prev.name}'" in msg and f"'{last.name}': Checkpoint" in msg and "its shards folder" in msg, msg
    assert learn.train_iter == 32  # (the data order differs from the sharded job's: the weights are not compared)


def test_flipped_bit_named_by_load(job, tmp_path):
    "A bit flipped inside a shard: `learn.load` names the file, and the learner is unchanged"
    d = _copy(job, tmp_path)
    shards = tf._shards(d/'models'/'m.pth')
    shard = sorted(shards.glob('*.distcp'))[0]
    data = bytearray(shard.read_bytes()); data[len(data)//2] ^= 1; shard.write_bytes(bytes(data))
    learn = _learner(d)
    before = _weights(learn)
    with pytest.raises(ValueError, match=f"shard '{shard}' is corrupt"): learn.load('m')
    for k, v in before.items(): assert torch.equal(learn.model.state_dict()[k], v), k


def test_crafted_metadata_never_runs(job, tmp_path):
    "A `.metadata` that runs code when unpickled: refused by checksum; with a forged manifest, by the allow-list"
    d, marker = _copy(job, tmp_path), tmp_path/'ran'
    pth = d/'models'/'m.pth'
    md = tf._shards(pth)/'.metadata'
    evil = pickle.dumps(Exploit(marker))
    evil += b' ' * (md.stat().st_size - len(evil))  # the size it had
    md.write_bytes(evil)
    learn = _learner(d)
    with pytest.raises(ValueError, match=r"\.metadata' is corrupt"): learn.load('m')
    state = torch.load(pth, weights_only=True)
    man = tf._manifest(state)
    for n in list(man): man[n] = man[n]['size'] if isinstance(man[n], dict) else man[n]  # sizes only: an older manifest
    torch.save(state, pth)
    with pytest.raises(ValueError, match='could run code'): learn.load('m')
    assert not marker.exists()
    # the newest checkpoint crafted the same way: resume='latest' passes over it, without running it
    last = sorted((d/'ckpt').glob('checkpoint_*.pth'))[-1]
    (tf._shards(last)/'.metadata').write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.warns(UserWarning, match='resuming from'): _learner(d).fit(2, resume='latest')
    assert not marker.exists()


def test_crafted_item_never_runs(job, tmp_path):
    "A shards folder written whole by an attacker, its manifest forged to match, with code in the optimizer's `lr`"
    from fastcb.sharded import save_shards, shard_payload
    d, marker = _copy(job, tmp_path), tmp_path/'ran'
    pth = d/'models'/'m.pth'
    learn = _learner(d)
    learn.create_opt()
    payload = shard_payload(learn.model, learn.opt)
    payload['opt']['param_groups'][0]['lr'] = Exploit(marker)
    folder = tf._shards(pth)
    shutil.rmtree(folder)
    forged = save_shards(payload, folder)
    state = torch.load(pth, weights_only=True)
    man = tf._manifest(state)
    man.clear(); man.update(forged)
    torch.save(state, pth)
    before = _weights(learn)
    with pytest.raises(ValueError, match=r"item 'opt\.param_groups\.0\.lr' that is not a tensor or a plain value"):
        learn.load('m')
    assert not marker.exists()
    for k, v in before.items(): assert torch.equal(learn.model.state_dict()[k], v), k
