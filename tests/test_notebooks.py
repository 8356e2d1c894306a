"""Every notebook in nbs/ runs once, exactly as `nbdev_test` runs it: nbdev's own `test_nb`, the same notebooks, the
same skipped flags (`tst_flags`), in the notebooks' folder. Why not call `nbdev_test`: its process pool finishes every
queued notebook before it honours Ctrl-C (tens of seconds), while here the two worker processes belong to this pytest
run and end with it -- on a failure, Ctrl-C or SIGTERM (`conftest.process_tree`).

The workers take notebooks one at a time, the longest first, so both cores stay busy; a notebook that runs past
NB_TIMEOUT seconds (env FASTCB_NB_TIMEOUT) fails and its worker is replaced. A failure names the notebook, the cell and
the error, as `nbdev_test` prints them."""
import json, os, selectors, subprocess, sys, time
from pathlib import Path
import pytest
from conftest import kill_tree

ROOT = Path(__file__).resolve().parents[1]
NB_TIMEOUT = int(os.environ.get('FASTCB_NB_TIMEOUT', 180))
N_WORKERS = 2
TAG = '@@fastcb-nb@@ '  # starts the worker's result lines; whatever else a notebook writes to stdout is ignored

WORKER = r'''
import contextlib, io, json, os, sys
from pathlib import Path
from nbdev.config import get_config
from nbdev.test import test_nb
cfg = get_config()
os.chdir(cfg.nbs_path)
for line in sys.stdin:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        ok, secs = test_nb(Path(line.strip()), skip_flags=cfg.tst_flags.split(), basepath=cfg.config_path)
    print(sys.argv[1] + json.dumps(dict(nb=line.strip(), ok=ok, secs=secs, err=err.getvalue()[-6000:])), flush=True)
'''


def notebooks():
    "The notebooks `nbdev_test` would run, the longest (most code) first"
    from nbdev.config import get_config
    from nbdev.doclinks import nbglob
    from nbdev.test import _keep_file
    files = [f for f in nbglob(get_config().nbs_path, as_path=True) if _keep_file(f, '.notest')]
    code = lambda f: sum(len(''.join(c['source'])) for c in json.loads(f.read_text())['cells'] if c['cell_type'] == 'code')
    return sorted(files, key=code, reverse=True)


NOTEBOOKS = notebooks()


class _Worker:
    "A python process that runs the notebooks it is sent, one at a time, and says how each went"
    def __init__(self, sel):
        env = {'OMP_NUM_THREADS': str(max(1, (os.cpu_count() or 1) // N_WORKERS)), **os.environ, 'PYTHONUNBUFFERED': '1'}
        env.pop('PYTEST_CURRENT_TEST', None)  # (torch's threads share the cores: 2 workers x all cores ran 1.7x slower)
        self.p = subprocess.Popen([sys.executable, '-c', WORKER, TAG], cwd=ROOT, env=env, text=True, bufsize=1,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self.sel, self.nb = sel, None
        sel.register(self.p.stdout, selectors.EVENT_READ, self)

    def send(self, nb): self.nb, self.t0 = nb, time.monotonic(); self.p.stdin.write(f'{nb}\n'); self.p.stdin.flush()

    def close(self):
        try: self.sel.unregister(self.p.stdout)
        except (KeyError, ValueError): pass
        kill_tree(self.p)


def run_all(nbs, n_workers=N_WORKERS, timeout=NB_TIMEOUT):
    "{notebook name: dict(ok, secs, err)} after running `nbs` on `n_workers` processes"
    todo, res, sel = list(nbs), {}, selectors.DefaultSelector()
    workers = [_Worker(sel) for _ in range(min(n_workers, len(todo)))]
    def feed(w):
        if todo: w.send(todo.pop(0))
        else: w.nb = None
    try:
        for w in workers: feed(w)
        while any(w.nb for w in workers):
            for key,_ in sel.select(timeout=1):
                w, line = key.data, key.fileobj.readline()
                if line.startswith(TAG):
                    r = json.loads(line[len(TAG):]); res[Path(r['nb']).name] = r; feed(w)
                elif not line:  # the worker died (a crash, a notebook that called os._exit...)
                    res[w.nb.name] = dict(ok=False, secs=time.monotonic() - w.t0, err=f'the worker process died ({w.p.wait()})')
                    w.close(); workers[workers.index(w)] = w = _Worker(sel); feed(w)
            for i,w in enumerate(workers):
                if w.nb and time.monotonic() - w.t0 > timeout:
                    res[w.nb.name] = dict(ok=False, secs=timeout, err=f'ran past the notebook budget of {timeout}s')
                    w.close(); workers[i] = w = _Worker(sel); feed(w)
    finally:
        for w in workers: w.close()
    return res


@pytest.fixture(scope='module')
def results(): return run_all(NOTEBOOKS)


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook(results, nb):
    r = results[nb.name]
    if not r['ok']: pytest.fail(f"{nb.name} failed after {r['secs']:.0f}s:\n{r['err']}", pytrace=False)


def test_failure_names_notebook_and_cell(tmp_path):
    "A failing cell fails with the notebook's name, the cell's code and the error"
    cells = [dict(id='a', cell_type='markdown', metadata={}, source='# Broken'),
             dict(id='b', cell_type='code', metadata={}, source='x = 1', outputs=[], execution_count=None),
             dict(id='c', cell_type='code', metadata={}, source='assert x == 2, "x is not 2"', outputs=[], execution_count=None)]
    p = tmp_path/'broken_nb.ipynb'
    p.write_text(json.dumps(dict(cells=cells, metadata=dict(kernelspec=dict(name='python3', display_name='Python 3',
                                                                             language='python')), nbformat=4, nbformat_minor=5)))
    r = run_all([p], n_workers=1, timeout=60)['broken_nb.ipynb']
    assert not r['ok'] and 'x is not 2' in r['err'] and 'assert x == 2' in r['err'], r
