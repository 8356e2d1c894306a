import faulthandler
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
