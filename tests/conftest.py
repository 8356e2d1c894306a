"""Shared test plumbing: time bounds, a folder shared by xdist workers, and a clean stop.

A run stops cleanly on Ctrl-C *and* on SIGTERM (what `timeout`, CI runners and `kill` send): SIGTERM is turned into the
`KeyboardInterrupt` that Ctrl-C raises, so pytest ends the session, runs the fixtures' teardown and every `finally`,
and `process_tree` ends whatever a test started -- `torchrun` jobs included, whose launcher and workers each run in a
session of their own and so never see the terminal's Ctrl-C."""
import collections, fcntl, faulthandler, os, signal, subprocess, threading
from contextlib import contextmanager
from pathlib import Path
import pytest


def _sigterm(signum, frame): raise KeyboardInterrupt(f'signal {signum}')

def pytest_configure(config):
    if threading.current_thread() is threading.main_thread(): signal.signal(signal.SIGTERM, _sigterm)


@pytest.fixture(autouse=True)
def _bounded(request):
    "Bound every test of a module that sets `LIMIT` (seconds): a hung test dumps its traceback and ends the run"
    limit = getattr(request.module, 'LIMIT', None)
    if limit is None:
        yield
        return
    faulthandler.dump_traceback_later(limit, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@contextmanager
def shared_dir(tmp_path_factory, name):
    "A folder shared by the pytest-xdist workers of this run, held under a lock; yields (folder, already built)"
    base = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'): base = base.parent
    with open(base/f'{name}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try: yield base/name, (base/name/'.done').exists()
        finally: fcntl.flock(lock, fcntl.LOCK_UN)


def descendants(pid):
    "The pids of the processes started by process `pid`, and theirs (Linux: from /proc)"
    kids = {}
    for st in Path('/proc').glob('[0-9]*/stat'):
        try: f = st.read_text().rsplit(')', 1)[1].split()
        except OSError: continue
        kids.setdefault(int(f[1]), []).append(int(st.parent.name))
    res, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []): res.append(k); todo.append(k)
    return res


def kill_tree(p):
    "SIGKILL `p` (a `Popen` started in a session of its own), everything it started and its process group; reap it"
    pids = [p.pid] + descendants(p.pid)  # before any dies: an orphan's parent is no longer `p`
    for pid in pids:
        try: os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError): pass
    try: os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError): pass
    p.wait()


@contextmanager
def process_tree(cmd, **kwargs):
    "`subprocess.Popen(cmd, **kwargs)` in a session of its own; leaving the block (done, failed, Ctrl-C, SIGTERM) kills what is left"
    p = subprocess.Popen(cmd, start_new_session=True, **kwargs)
    try: yield p
    finally: kill_tree(p)


from torch.utils._python_dispatch import TorchDispatchMode

class OpCounter(TorchDispatchMode):
    "The ATen ops (views aside: they launch no kernel) run while `on`, one Counter per batch (`start` opens one)"
    def __init__(self): super().__init__(); self.on,self.batches = False,[]
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and not func.is_view: self.batches[-1][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))
    def start(self): self.batches.append(collections.Counter()); self.on = True
