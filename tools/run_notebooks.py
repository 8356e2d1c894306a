"""Execute the notebooks and keep their outputs, so that the docs show the code at work (epoch tables, plots, the final
state of progress bars, printed values), as fastai's and nbdev's own pages do.

    python tools/run_notebooks.py                    # every notebook in nbs/
    python tools/run_notebooks.py nbs/06_learner.ipynb nbs/16_tutorial.ipynb

Each notebook runs top to bottom in a fresh Jupyter kernel (the one of this environment) from `nbs/`, like a reader
would run it; its outputs replace the old ones (what went to stderr -- warnings -- is left out), and `nbdev_clean`
then removes execution counts and metadata. An output
that shows something of this machine -- a file path under a temporary, home or work folder, a process id, an object's
memory address -- is an error naming the notebook and the cell: the docs must read the same wherever they are built.
Run it after editing a notebook (`nbdev_export` first), and commit the notebook with its outputs."""
from __future__ import annotations
import argparse, os, re, subprocess, sys, time
from pathlib import Path

root = Path(__file__).resolve().parent.parent
MACHINE = [re.compile(p) for p in (r'/tmp/\S', r'/var/folders/\S', r'/(?:home|root|work|Users)/\S', r'\bpid[ =:]+\d+',
                                   r'\bat 0x[0-9a-f]{6,}', r'\bprocess \d{3,}\b')]

def _texts(out):
    "The text an output shows (streams, plain text, HTML, markdown; not images)"
    if out.get('output_type') == 'stream': yield out.get('text', '')
    for k in ('text/plain', 'text/html', 'text/markdown'):
        v = out.get('data', {}).get(k)
        if v: yield ''.join(v) if isinstance(v, list) else v
    if out.get('output_type') == 'error': yield '\n'.join(out.get('traceback', []))

def machine_traces(nb):
    "`(cell index, text)` of the outputs that show something of this machine"
    res = []
    for i,c in enumerate(nb.cells):
        for out in c.get('outputs', []):
            for t in _texts(out):
                for p in MACHINE:
                    m = p.search(t)
                    if m: res.append((i, t[max(0, m.start()-40):m.end()+40].replace('\n', ' ')))
    return res

def run(path:Path, timeout:int=600):
    "Execute notebook `path` in place; return the problems found (an empty list when all is well)"
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    os.environ.setdefault('MPLBACKEND', 'module://matplotlib_inline.backend_inline')  # figures as images in the outputs
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}})
    try: client.execute()
    except Exception as e: return [f'{path.name}: {type(e).__name__}: {str(e)[-1500:]}']
    for c in nb.cells:  # warnings and other stderr: noise for a reader, and they name this machine's files
        if c.cell_type == 'code': c.outputs = [o for o in c.outputs if not (o.output_type == 'stream' and o.name == 'stderr')]
    probs = [f'{path.name}, cell {i}: an output shows this machine: ...{t}...' for i,t in machine_traces(nb)]
    if not probs:
        nbformat.write(nb, path)
        subprocess.run(['nbdev_clean', '--fname', str(path)], cwd=root, check=True, capture_output=True)
    return probs

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('notebooks', nargs='*', help='notebooks to run (default: every notebook in nbs/)')
    args = ap.parse_args()
    nbs = [Path(p) for p in args.notebooks] or sorted(p for p in (root/'nbs').glob('*.ipynb') if not p.name.startswith('_'))
    probs = []
    for p in nbs:
        t0 = time.time()
        ps = run(p.resolve())
        print(f"{p.name}: {'ok' if not ps else 'FAILED'} ({time.time()-t0:.0f} s)", flush=True)
        probs += ps
    if probs: sys.exit('\n'.join(probs))

if __name__ == '__main__': main()
