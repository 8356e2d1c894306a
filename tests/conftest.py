import fcntl, faulthandler, os
from contextlib import contextmanager
import pytest


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
