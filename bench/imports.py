#!/usr/bin/env python
"""Import time of `fastcb.all` on top of `import torch` (and of fastai / Lightning / ignite when importable).

Each statement runs in fresh interpreters, interleaved, several times; the table gives the median wall and CPU time
of the whole process (start-up + imports + exit), the import's own time measured inside a process that imported torch
first, and the heavy packages it loaded that `import torch` had not. See bench/README.md.

    python bench/imports.py            # 9 rounds
    python bench/imports.py --rounds 3
"""
from __future__ import annotations
from _machine import machine_line
import argparse, importlib.util, json, os, platform, resource, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HEAVY = ['numpy', 'matplotlib', 'pandas', 'sklearn', 'scipy', 'fastprogress', 'tqdm', 'rich', 'IPython', 'PIL',
         'torchvision', 'torchmetrics', 'tensorboard', 'yaml', 'requests']

# (label, module that must be importable, statement)
CASES = [('python (nothing)', None, 'pass'),
         ('import torch', 'torch', 'import torch'),
         ('import fastcb.all', 'fastcb', 'import fastcb.all'),
         ('from fastai.learner import Learner', 'fastai', 'from fastai.learner import Learner'),
         ('import lightning.pytorch', 'lightning', 'import lightning.pytorch'),
         ('import pytorch_lightning', 'pytorch_lightning', 'import pytorch_lightning'),
         ('import ignite.engine', 'ignite', 'import ignite.engine')]

_PROBE = """
import sys, time, json
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
before = set(sys.modules)
{stmt}
t2 = time.perf_counter()
print(json.dumps({{'torch': t1 - t0, 'rest': t2 - t1, 'mods': sorted(m for m in {heavy!r} if m in set(sys.modules) - before)}}))
"""

def _child_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime

def run_once(stmt, in_process):
    "(wall s, CPU s) of a fresh `python -c stmt`; with `in_process`, also the in-process import times"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
    code = _PROBE.format(stmt=stmt, heavy=HEAVY) if in_process else stmt
    t, c = time.perf_counter(), _child_cpu()
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=ROOT)
    wall, cpu = time.perf_counter() - t, _child_cpu() - c
    if out.returncode: raise RuntimeError(f"`{stmt}` failed: {out.stderr[-500:]}")
    return (wall, cpu), (json.loads(out.stdout.strip().splitlines()[-1]) if in_process else None)

def available(mod):
    try: return mod is None or importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError): return False

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--rounds', type=int, default=9)
    ap.add_argument('--json', help='also write the results to this file')
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    cases = [c for c in CASES if available(c[1])]
    notes = [f"{c[0]}: not importable, skipped" for c in CASES if not available(c[1])]
    for c in cases: run_once(c[2], False)  # warm the file cache
    walls = {c[0]: [] for c in cases}; cpus = {c[0]: [] for c in cases}; inner = {c[0]: [] for c in cases}; mods = {}
    for r in range(args.rounds):
        k = r % len(cases)
        for label, _, stmt in cases[k:] + cases[:k]:
            (w, c), _ = run_once(stmt, False)
            walls[label].append(w); cpus[label].append(c)
            if label in ('python (nothing)', 'import torch'): continue
            _, v = run_once(stmt, True)
            inner[label].append(v['rest']); mods[label] = v['mods']
    med = statistics.median
    print(machine_line('imports.py'))
    print(f"# median of {args.rounds} fresh processes per statement, interleaved (file cache warm); 'CPU' is the "
          f"process's user+sys time, steadier than wall time on a busy machine")
    print()
    print(f"| {'statement':34} | {'wall s':>6} | {'CPU s':>6} | {'CPU on top of torch':>19} | {'in-process, after torch':>23} | heavy packages it loaded |")
    print(f"|{'-'*36}|{'-'*7}:|{'-'*7}:|{'-'*20}:|{'-'*24}:|---|")
    rows = []
    base = med(cpus['import torch'])
    for label, _, _ in cases:
        w, c = med(walls[label]), med(cpus[label])
        top = c - base if label not in ('python (nothing)', 'import torch') else None
        ins = med(inner[label]) if inner[label] else None
        m = ', '.join(x for x in mods.get(label, []) if x != 'numpy') or ('-' if inner[label] else '')
        print(f"| {label:34} | {w:6.2f} | {c:6.2f} | {f'{top:+.2f} s' if top is not None else '':>19} | "
              f"{f'+{ins:.3f} s' if ins is not None else '':>23} | {m} |")
        rows.append({'statement': label, 'wall': w, 'cpu': c, 'cpu_on_top_of_torch': top, 'in_process': ins,
                     'imported': mods.get(label)})
    for n in notes: print(f"note: {n}")
    if args.json:
        with open(args.json, 'w') as f: json.dump({'rows': rows, 'notes': notes, 'walls': walls, 'cpus': cpus}, f, indent=1)

if __name__ == '__main__': main()
