"""Peak extra memory and time of `get_preds` on ~200 MB of predictions (50,000 x 1,000 float32).

Each case runs in a fresh subprocess. After the data, model and learner are built and warmed up, the process's peak
resident set size is reset (`/proc/self/clear_refs`), and the peak during the call is read from `VmHWM` in
`/proc/self/status` (a thread sampling `VmRSS` every millisecond is the fallback where the reset is not allowed).
"Extra" is that peak minus the resident size just before the call: what the call itself needed, result included.
tracemalloc is not used: it does not see torch's allocations.

Each case is repeated `--repeat` times, a fresh process each: the table shows the medians and, for the peak, the
lowest and highest run. The spread matters: on the CPU the small tensors of a batch and its large temporaries (the
model's output, the loss's) share glibc's heap, and whether a freed temporary's hole is reused or left behind
depends on the heap's layout, which differs from process to process. A case that stays low in one process and
reaches 2x in another is flagged below the table; `--runs` prints every run. "heap holes" is how much the free
space inside glibc's heap grew from just before the call to just after it (`mallinfo2().fordblks`): memory the process
keeps resident but no longer uses, the mark of that fragmentation (holes given back to the system as the call ends are
not counted; blank where glibc's `mallinfo2` is not available).
Usage: python bench/preds_memory.py [--n 50000] [--d 1000] [--bs 500] [--repeat 5] [--cases fastcb,torch] [--runs]
(Linux; CPU)
"""
import argparse, ctypes, gc, json, os, statistics, subprocess, sys, tempfile, threading, time

def _status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'): return int(line.split()[1]) * 1024
    raise KeyError(key)

def _heap_free():
    "Free bytes inside glibc's heap (`mallinfo2().fordblks`), or None where that is not available"
    try: f = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError): return None
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]
    f.restype = MallInfo2
    return f().fordblks

class PeakRSS:
    "Peak resident memory of this process while the `with` block runs, minus the resident memory at its start"
    def __enter__(self):
        gc.collect()
        try:
            with open('/proc/self/clear_refs', 'w') as f: f.write('5')  # reset VmHWM to the current RSS
            self.hwm = _status('VmHWM') <= _status('VmRSS') + (1 << 20)
        except OSError: self.hwm = False
        self.base, self.peak, self._stop, self.heap0 = _status('VmRSS'), 0, False, _heap_free()
        def _sample():
            while not self._stop:
                self.peak = max(self.peak, _status('VmRSS')); time.sleep(0.001)
        self._t = threading.Thread(target=_sample, daemon=True); self._t.start()
        self.t0 = time.perf_counter()
        return self
    def __exit__(self, *exc):
        self.time = time.perf_counter() - self.t0
        self._stop = True; self._t.join()
        self.peak = max(self.peak, _status('VmHWM') if self.hwm else _status('VmRSS'))
        self.extra = self.peak - self.base
        h = _heap_free()
        self.holes = None if h is None or self.heap0 is None else h - self.heap0

def _data(n, d, bs, shuffle=False, drop_last=False):
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(0)
    x, y = torch.randn(n, 16), torch.randint(0, d, (n,))
    return x, y, DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=shuffle, drop_last=drop_last)

def case(name, n, d, bs):
    "Run one case in this process; return a dict of figures"
    import torch
    from torch import nn
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    shuffle = name.endswith('shuffled')
    x, y, dl = _data(n, d, bs, shuffle=shuffle, drop_last=shuffle)
    model = nn.Linear(16, d)
    tmp = tempfile.mkdtemp()
    small = _data(2*bs, d, bs)[2]
    res = {'case': name}
    if name.startswith('fastcb'):
        from fastcb.learner import Learner, DataLoaders
        from fastcb.preds import load_preds
        learn = Learner(DataLoaders(dl, dl, device='cpu'), model, loss_func=nn.CrossEntropyLoss())
        learn.get_preds(dl=small)  # warm up
        if name == 'fastcb load_preds':
            learn.get_preds(with_preds=False, save_preds=tmp)
            gc.collect()
            with PeakRSS() as m: preds = load_preds(tmp)
        else:
            kw = dict(with_preds=False, save_preds=tmp) if 'stream' in name else {}
            with PeakRSS() as m: preds, targs = learn.get_preds(ds_idx=0, **kw)
            if 'stream' in name: preds = load_preds(tmp)
    elif name.startswith('fastai'):
        from fastai.learner import Learner as FLearner
        from fastai.data.core import DataLoaders as FDataLoaders
        from fastai.data.load import DataLoader as FDataLoader
        from fastai.torch_core import default_device
        default_device(False)
        ds = list(zip(x, y))
        fdl = FDataLoader(ds, bs=bs, shuffle=shuffle, drop_last=shuffle)
        learn = FLearner(FDataLoaders(fdl, fdl, device='cpu'), model, loss_func=nn.CrossEntropyLoss())
        learn.get_preds(dl=FDataLoader(ds[:2*bs], bs=bs))
        with PeakRSS() as m: preds, targs = learn.get_preds(ds_idx=0)
    elif name == 'torch list + cat':
        model.eval(); next(iter(small))
        with PeakRSS() as m:
            with torch.no_grad(): preds = torch.cat([model(xb) for xb, _ in dl])
    elif name == 'torch preallocated':
        model.eval(); next(iter(small))
        with PeakRSS() as m:
            with torch.no_grad():
                preds, i = torch.empty(n, d), 0
                for xb, _ in dl: preds[i:i+len(xb)] = model(xb); i += len(xb)
    else: raise ValueError(name)
    assert preds.shape == (n, d), preds.shape
    with torch.no_grad(): ref = model(x[:5])
    assert torch.allclose(preds[:5], ref, atol=1e-5, rtol=1e-4), 'not in dataset order'
    res.update(extra=m.extra, time=m.time, holes=m.holes, method='VmHWM' if m.hwm else 'RSS sampling')
    return res

CASES = ['torch preallocated', 'torch list + cat', 'fastcb get_preds', 'fastcb get_preds shuffled',
         'fastcb streamed (with_preds=False, save_preds)', 'fastcb load_preds', 'fastai get_preds',
         'fastai get_preds shuffled']

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=50_000); p.add_argument('--d', type=int, default=1_000)
    p.add_argument('--bs', type=int, default=500); p.add_argument('--repeat', type=int, default=5)
    p.add_argument('--cases', default=None, help='comma-separated substrings: run only the matching cases')
    p.add_argument('--runs', action='store_true', help='print the peak of every run, not only the median and range')
    p.add_argument('--one', default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(case(a.one, a.n, a.d, a.bs))); return
    try:
        import fastai  # noqa: F401
        has_fastai = True
    except ImportError: has_fastai = False
    size = a.n * a.d * 4
    print(f"get_preds over {a.n:,} x {a.d:,} float32 predictions = {size/2**20:.0f} MiB, batch size {a.bs}, "
          f"{os.cpu_count()} CPU(s), torch {__import__('torch').__version__}\n")
    print(f"{'case':48} {'peak extra MiB':>14} {'x preds':>8} {'min-max':>11} {'heap holes MiB':>14} {'time s':>7}"
          f"  method (medians of {a.repeat} fresh processes)")
    notes = []
    cases = [c for c in CASES if a.cases is None or any(k.strip() in c for k in a.cases.split(','))]
    for c in cases:
        if c.startswith('fastai') and not has_fastai:
            print(f"{c:48} {'skipped: fastai is not installed':>31}"); continue
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''))
        runs = []
        for _ in range(a.repeat):
            r = subprocess.run([sys.executable, __file__, '--one', c, '--n', str(a.n), '--d', str(a.d), '--bs', str(a.bs)],
                               capture_output=True, text=True, env=env)
            if r.returncode: break
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
        if r.returncode:
            print(f"{c:48} failed (see below)"); notes.append(f"{c}: {r.stderr.strip().splitlines()[-1]}"); continue
        xs = [o['extra']/size for o in runs]
        extra,t = statistics.median(o['extra'] for o in runs),statistics.median(o['time'] for o in runs)
        hs = [o['holes'] for o in runs if o.get('holes') is not None]
        holes = f"{statistics.median(hs)/2**20:.0f}" if hs else ''
        rng = f'{min(xs):.2f}-{max(xs):.2f}'
        print(f"{c:48} {extra/2**20:14.0f} {extra/size:8.2f} {rng:>11} {holes:>14} {t:7.2f}  {runs[0]['method']}")
        if a.runs: print(f"{'':48} runs: {' '.join(f'{x:.2f}' for x in xs)}" +
                         (f"; heap holes MiB: {' '.join(f'{h/2**20:.0f}' for h in hs)}" if hs else ''))
        if max(xs) - min(xs) > 0.1:
            notes.append(f"{c}: the peak varies between processes, {min(xs):.2f}x to {max(xs):.2f}x the predictions "
                         f"({sum(x > min(xs) + 0.1 for x in xs)} of {len(xs)} runs above {min(xs) + 0.1:.2f}x)")
    if notes: print()
    for n in notes: print(n)
    if not has_fastai: print("\nfastai is not installed here: `pip install fastai` and rerun to compare side by side.")

if __name__ == '__main__': main()
