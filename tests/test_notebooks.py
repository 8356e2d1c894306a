"""Every notebook in nbs/ runs top to bottom in a real Jupyter kernel, as a user runs it (not only under `nbdev_test`,
which skips nothing here but runs cells in its own shell). A failure names the notebook and the cell. The kernel runs
in nbs/ with its proxies pointed at a closed port, so a cell that reaches for the network fails instead of hanging.
Each notebook has a time budget of NB_TIMEOUT seconds (env FASTCB_NB_TIMEOUT)."""
import json, os, re, time, warnings
from pathlib import Path
import pytest

root = Path(__file__).resolve().parent.parent
NBS = root/'nbs'
NB_TIMEOUT = int(os.environ.get('FASTCB_NB_TIMEOUT', 180))
NOTEBOOKS = sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')))
_NO_NET = 'http://127.0.0.1:9'  # discard port: connections are refused at once

def _kernel_env():
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', no_proxy='', NO_PROXY='')
    for k in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'all_proxy'): env[k] = _NO_NET
    for k in ('IN_TEST', 'MPLBACKEND'): env.pop(k, None)  # as in a user's Jupyter: no nbdev test flag, inline plots
    return env

def run_notebook(path, timeout=NB_TIMEOUT, cwd=None):
    "Execute notebook `path` top to bottom in a fresh python3 kernel; raise AssertionError naming notebook and cell"
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    path = Path(path)
    with warnings.catch_warnings():  # cells without ids (nbdev_clean adds them) are fine for running
        warnings.simplefilter('ignore')
        nb = nbformat.read(path, as_version=4)
    deadline = time.monotonic() + timeout
    state = {}
    def cell_timeout(cell): return max(1, int(deadline - time.monotonic()))
    def on_start(cell, cell_index): state['idx'] = cell_index
    client = NotebookClient(nb, timeout=timeout, timeout_func=cell_timeout, kernel_name='python3',
                            allow_errors=False, interrupt_on_timeout=True, on_cell_start=on_start,
                            shutdown_kernel='immediate',
                            resources={'metadata': {'path': str(cwd or path.parent)}})
    def where(what='failed'):
        i = state.get('idx')
        if i is None: return f'{path.name}: the kernel failed to start'
        code_no = sum(c.cell_type == 'code' for c in nb.cells[:i + 1])
        src = nb.cells[i].source
        return f'{path.name}: cell {i} (code cell {code_no}) {what}:\n{src[:800]}' + (' [...]' if len(src) > 800 else '')
    def error():
        i = state.get('idx')
        errs = [o for o in nb.cells[i].get('outputs', []) if o.get('output_type') == 'error'] if i is not None else []
        if not errs: return ''
        tb = re.sub(r'\x1b\[[0-9;]*m', '', '\n'.join(errs[-1].get('traceback', [])))
        return f"\n--- {errs[-1].get('ename')}: {errs[-1].get('evalue')} ---\n{tb[-2500:]}"
    try: client.execute(env=_kernel_env())
    except CellTimeoutError: raise AssertionError(where(f'ran past the notebook budget of {timeout}s')) from None
    except CellExecutionError as e: raise AssertionError(where() + (error() or f'\n{e}'[-2500:])) from None
    except DeadKernelError as e: raise AssertionError(f'{where()}\nthe kernel died: {e}') from None
    return nb

@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(nb):
    err = None
    try: run_notebook(nb)
    except AssertionError as e: err = str(e)
    if err: pytest.fail(err, pytrace=False)

def test_failure_names_notebook_and_cell(tmp_path):
    "A failing cell fails with the notebook name, the cell and the error"
    cells = [dict(id='a', cell_type='markdown', metadata={}, source='# Broken'),
             dict(id='b', cell_type='code', metadata={}, source='x = 1', outputs=[], execution_count=None),
             dict(id='c', cell_type='code', metadata={}, source='assert x == 2, "x is not 2"', outputs=[],
                  execution_count=None)]
    p = tmp_path/'broken_nb.ipynb'
    p.write_text(json.dumps(dict(cells=cells, metadata=dict(kernelspec=dict(name='python3', display_name='Python 3',
                                                                                 language='python')),
                                 nbformat=4, nbformat_minor=5)))
    with pytest.raises(AssertionError) as ei: run_notebook(p, timeout=60)
    msg = str(ei.value)
    assert 'broken_nb.ipynb: cell 2 (code cell 2) failed' in msg and 'x is not 2' in msg and 'assert x == 2' in msg, msg
