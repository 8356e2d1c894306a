#!/usr/bin/env python
"""Training-loop overhead of fastcb (and fastai / Lightning / ignite when importable) against a hand-written PyTorch loop.

Every variant runs in its own process with one torch thread; the parent drives them epoch by epoch, in a rotating
order, so that all variants see the same machine noise, and reports medians over the rounds. See bench/README.md.

    python bench/loop_overhead.py              # full run (a few minutes)
    python bench/loop_overhead.py --quick      # fewer rounds, for a smoke test
"""
from __future__ import annotations
from _machine import machine_line
import argparse, importlib.util, json, os, platform, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
N_CBS = 20  # extra callbacks in the `+20 cbs` variants

# ---------------------------------------------------------------------------------------------------------- workloads
def _setup_torch():
    import torch
    torch.set_num_threads(1)
    try: torch.set_num_interop_threads(1)
    except RuntimeError: pass
    return torch

def make_task(kind, n_train, n_valid):
    "Model factory, loss and pre-collated batches (a plain list, the same for every framework: no DataLoader cost)"
    torch = _setup_torch()
    from torch import nn
    g = torch.Generator().manual_seed(0)
    if kind == 'mlp':
        shape = (32,)
        def mk_model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    else:
        shape = (3, 8, 8)
        def mk_model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    mk = lambda n: Batches([(torch.randn(64, *shape, generator=g), torch.randint(0, 10, (64,), generator=g)) for _ in range(n)])
    return mk_model, nn.CrossEntropyLoss(), mk(n_train), mk(n_valid)

class Batches:
    "Pre-collated batches: an iterable with a length (not a list, which Lightning would take for several loaders)"
    def __init__(self, batches): self.batches = batches
    def __len__(self): return len(self.batches)
    def __iter__(self): return iter(self.batches)

# ------------------------------------------------------------------------------------------------------------ workers
# A worker builds its variant, then answers each `run` line on stdin with the seconds one epoch took.
# `epoch()` = training on every training batch + validation (mean loss) on every validation batch.

def w_raw(kind, train, valid, mk_model, loss_func, extra):
    "The hand-written loop: what a PyTorch user writes without a framework (and no more)"
    import torch
    dev = torch.device('cpu')
    model = mk_model().to(dev); opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    def epoch():
        model.train()
        for xb,yb in train:
            xb,yb = xb.to(dev, non_blocking=True),yb.to(dev, non_blocking=True)
            loss = loss_func(model(xb), yb)
            loss.backward(); opt.step(); opt.zero_grad()
        model.eval()
        tot = torch.zeros((), device=dev)
        with torch.no_grad():
            for xb,yb in valid:
                xb,yb = xb.to(dev, non_blocking=True),yb.to(dev, non_blocking=True)
                tot += loss_func(model(xb), yb)
        return (tot/len(valid)).item()  # the one read of the epoch
    return epoch

def _noop_fastcb_cbs(n, counter=None):
    from fastcb.core import Callback, event
    def mk(e):
        if counter is None: return lambda self: None
        def f(self): counter[0] += 1
        return f
    cls = type('Noop', (Callback,), {e: mk(e) for e in event})
    return [cls() for _ in range(n)]

def w_fastcb(kind, train, valid, mk_model, loss_func, extra):
    import torch
    if 'progress' in extra: import fastcb.progress as fp  # ImportError -> variant skipped
    from fastcb.learner import Learner, DataLoaders, defaults
    defaults.callbacks[:] = [c for c in defaults.callbacks if 'Progress' not in c.__name__]
    cbs = []
    if 'progress' in extra:  # drawn as on a terminal (redrawn with `\r` every `refresh` s), into /dev/null
        cbs.append(fp.ProgressCallback(mode='tty', file=open(os.devnull, 'w')))
    if 'cbs' in extra:
        counter = [0]
        learn = Learner(DataLoaders(train, valid, device='cpu'), mk_model(), loss_func, cbs=_noop_fastcb_cbs(N_CBS, counter))
        counter[0] = 0  # not `after_create`
        learn.fit(1)
        extra['calls_per_cb'] = counter[0] / N_CBS  # calls of one callback in one `fit(1)`
        cbs += _noop_fastcb_cbs(N_CBS)
    learn = Learner(DataLoaders(train, valid, device='cpu'), mk_model(), loss_func, cbs=cbs)
    if 'profile' in extra:
        import fastcb.profile  # noqa: F401  (adds Learner.profile_callbacks)
        learn.profile_callbacks(show=False)  # stays on for the whole run
    def epoch(): learn.fit(1)  # the default logger prints one row per epoch (into /dev/null)
    return epoch

def w_fastai(kind, train, valid, mk_model, loss_func, extra):
    import torch
    from fastai.learner import Learner
    from fastai.data.core import DataLoaders
    from fastai.callback.core import Callback
    from fastai.callback.progress import ProgressCallback
    cbs = []
    if 'cbs' in extra:
        evs = ('before_fit before_epoch before_train before_batch after_pred after_loss before_backward after_backward '
               'before_step after_step after_cancel_batch after_batch after_cancel_train after_train before_validate '
               'after_cancel_validate after_validate after_cancel_epoch after_epoch after_cancel_fit after_fit').split()
        counter = [0]
        def f(self): counter[0] += 1
        Counting = type('Counting', (Callback,), {e: f for e in evs})
        Noop = type('Noop', (Callback,), {e: (lambda self: None) for e in evs})
        learn = Learner(DataLoaders(train, valid, device='cpu'), mk_model(), loss_func, opt_func=_fastai_adam(),
                        cbs=[Counting() for _ in range(N_CBS)])
        with learn.no_logging(), learn.no_bar(): learn.fit(1)
        extra['calls_per_cb'] = counter[0] / N_CBS
        cbs = [Noop() for _ in range(N_CBS)]
    learn = Learner(DataLoaders(train, valid, device='cpu'), mk_model(), loss_func, opt_func=_fastai_adam(), cbs=cbs)
    if 'progress' not in extra: learn.remove_cbs(ProgressCallback)
    def epoch(): learn.fit(1)
    return epoch

def _fastai_adam():
    "fastai with a torch optimizer (like the other variants), through its `OptimWrapper`"
    import torch
    from functools import partial
    from fastai.optimizer import OptimWrapper
    return partial(OptimWrapper, opt=torch.optim.Adam)

def w_lightning(kind, train, valid, mk_model, loss_func, extra):
    "Lightning drives the loop itself: a callback blocks at each epoch start until the parent asks for an epoch"
    import torch
    try: import lightning.pytorch as pl
    except ImportError: import pytorch_lightning as pl
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__(); self.model = mk_model()
        def training_step(self, b, i): return loss_func(self.model(b[0]), b[1])
        def validation_step(self, b, i): self.log('valid_loss', loss_func(self.model(b[0]), b[1]))
        def configure_optimizers(self): return torch.optim.Adam(self.parameters(), lr=1e-3)
    cbs, counter = [], [0]
    if 'cbs' in extra:
        hooks = [h for h in dir(pl.Callback) if h.startswith('on_') and h not in
                 ('on_save_checkpoint', 'on_load_checkpoint', 'on_exception')]
        def f(self, *a, **k): counter[0] += 1
        Counting = type('Counting', (pl.Callback,), {h: f for h in hooks})
        cbs = [Counting() for _ in range(N_CBS)]
    return _driven(lambda stepper: pl.Trainer(
        max_epochs=10**6, accelerator='cpu', devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, enable_progress_bar='progress' in extra,
        callbacks=[stepper(pl.Callback, 'on_train_epoch_start', 'on_validation_epoch_end'), *cbs]
    ).fit(Module(), train, valid), extra, counter)

def w_ignite(kind, train, valid, mk_model, loss_func, extra):
    import torch
    from ignite.engine import Events, create_supervised_trainer, create_supervised_evaluator
    from ignite.metrics import Loss
    model = mk_model(); opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    trainer = create_supervised_trainer(model, opt, loss_func)
    evaluator = create_supervised_evaluator(model, metrics={'loss': Loss(loss_func)})
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: evaluator.run(valid))
    counter = [0]
    if 'progress' in extra:
        from ignite.contrib.handlers import ProgressBar
        ProgressBar(persist=False).attach(trainer)
    if 'cbs' in extra:
        evs = [Events.STARTED, Events.EPOCH_STARTED, Events.ITERATION_STARTED, Events.GET_BATCH_STARTED,
               Events.GET_BATCH_COMPLETED, Events.ITERATION_COMPLETED, Events.EPOCH_COMPLETED, Events.COMPLETED]
        def f(engine): counter[0] += 1
        for _ in range(N_CBS):
            for e in evs: trainer.add_event_handler(e, f)
    def run(stepper):
        st = stepper()
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: st.start())
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: st.end())  # after the evaluator's run
        trainer.run(train, max_epochs=10**6)
    return _driven(run, extra, counter)

class _Done(Exception): pass

def _driven(run, extra, counter):
    """For frameworks that own the epoch loop (Lightning, ignite): run it here; each epoch waits in its start hook for
    the parent's `run`, and is timed from there to the end of its validation. The time is sent when the next epoch starts."""
    class Stepper:
        t0, n, pending = None, 0, None
        def start(self):
            if self.t0 is not None: return
            if self.n: _reply({'t': self.pending[0], 'wall': self.pending[1],
                               'calls_per_cb': counter[0] / N_CBS / self.n if 'cbs' in extra else None})
            self.n += 1
            if sys.stdin.readline().strip() != 'run': raise _Done()
            self.t0 = _clocks()
        def end(self):
            if self.t0 is None: return
            self.pending, self.t0 = _elapsed(self.t0), None
    st = Stepper()
    def stepper(base=None, start_hook=None, end_hook=None):
        "The stepper itself, or a callback class of `base` that calls it from `start_hook` and `end_hook`"
        if base is None: return st
        return type('Stepper', (base,), {start_hook: lambda self, *a, **k: st.start(),
                                         end_hook: lambda self, *a, **k: st.end()})()
    _reply({'ready': True})
    try: run(stepper)
    except _Done: pass
    return None

def _clocks(): return time.process_time(), time.perf_counter()
def _elapsed(t0):
    "(CPU seconds of this process, wall seconds) since `t0 = _clocks()`"
    t1 = _clocks()
    return t1[0] - t0[0], t1[1] - t0[1]

def _reply(v):
    _PROTO.write(json.dumps(v) + '\n'); _PROTO.flush()

_PROTO = None
WORKERS = {'raw': w_raw, 'fastcb': w_fastcb, 'fastai': w_fastai, 'lightning': w_lightning, 'ignite': w_ignite}

def worker_main(args):
    global _PROTO
    # the protocol uses a private copy of stdout; the variant's own prints (progress bars) go to /dev/null
    _PROTO = os.fdopen(os.dup(1), 'w')
    devnull = os.open(os.devnull, os.O_WRONLY); os.dup2(devnull, 1); os.dup2(devnull, 2)
    sys.path.insert(0, args.root or ROOT)
    extra = {k: True for k in args.extra.split(',') if k}
    mk_model, loss_func, train, valid = make_task(args.task, args.batches, max(1, args.batches // 5))
    try: epoch = WORKERS[args.worker](args.task, train, valid, mk_model, loss_func, extra)
    except Exception as e:
        if _PROTO.closed: raise
        return _reply({'ready': False, 'error': f'{type(e).__name__}: {e}'[:300]})
    if epoch is None: return  # driven frameworks answered everything themselves
    _reply({'ready': True})
    for line in sys.stdin:
        if line.strip() != 'run': break
        t0 = _clocks()
        try: epoch()
        except Exception as e: return _reply({'error': f'{type(e).__name__}: {e}'[:300]})
        cpu, wall = _elapsed(t0)
        _reply({'t': cpu, 'wall': wall, 'calls_per_cb': extra.get('calls_per_cb')})

# -------------------------------------------------------------------------------------------------------------- parent
def available(fw):
    mod = {'raw': 'torch', 'fastcb': 'fastcb', 'fastai': 'fastai', 'ignite': 'ignite',
           'lightning': 'lightning' if importlib.util.find_spec('lightning') else 'pytorch_lightning'}[fw]
    try: return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError): return False

class Worker:
    def __init__(self, name, fw, task, extra, batches, root=None):
        self.name, self.times, self.walls, self.info = name, [], [], {}
        cmd = [sys.executable, os.path.abspath(__file__), '--worker', fw, '--task', task, '--extra', extra,
               '--batches', str(batches)] + (['--root', root] if root else [])
        env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=os.pathsep.join(
            [root or ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)

    def ready(self):
        "True when the worker is set up; else `self.error` says why"
        line = self.p.stdout.readline()
        v = json.loads(line) if line else {'error': 'the worker died during setup'}
        self.error = v.get('error')
        return v.get('ready', False)

    def run_epoch(self, record=True):
        self.p.stdin.write('run\n'); self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line: raise RuntimeError(f"worker {self.name} died")
        v = json.loads(line)
        if 'error' in v: raise RuntimeError(f"worker {self.name} failed: {v['error']}")
        if record: self.times.append(v['t']); self.walls.append(v['wall'])
        if v.get('calls_per_cb'): self.info['calls_per_cb'] = v['calls_per_cb']

    def close(self):
        try: self.p.stdin.write('quit\n'); self.p.stdin.flush()
        except (BrokenPipeError, OSError): pass
        try: self.p.wait(timeout=30)
        except subprocess.TimeoutExpired: self.p.kill()

def variants(args):
    "(name, framework, task, extra, group) of every variant to run; `group` names its raw-loop reference"
    vs = []
    fws = [f for f in ('fastcb', 'fastai', 'lightning', 'ignite') if f in args.frameworks]
    if not args.no_mlp: vs.append(('raw loop (MLP)', 'raw', 'mlp', '', 'mlp'))
    for fw in (fws if not args.no_mlp else []):
        vs.append((f'{fw} (MLP)', fw, 'mlp', '', 'mlp'))
        vs.append((f'{fw} + progress bar (MLP)', fw, 'mlp', 'progress', 'mlp'))
        vs.append((f'{fw} + {N_CBS} cbs (MLP)', fw, 'mlp', 'cbs', 'mlp'))
    if not args.no_mlp and args.base and 'fastcb' in fws:
        vs += [('fastcb@base (MLP)', 'fastcb', 'mlp', '', 'mlp', args.base),
               ('fastcb@base + progress bar (MLP)', 'fastcb', 'mlp', 'progress', 'mlp', args.base),
               (f'fastcb@base + {N_CBS} cbs (MLP)', 'fastcb', 'mlp', 'cbs', 'mlp', args.base)]
    if not args.no_mlp:
        if 'fastcb' in fws and args.profile: vs.append(('fastcb + profile_callbacks on (MLP)', 'fastcb', 'mlp', 'profile', 'mlp'))
    if not args.no_conv:
        vs.append(('raw loop (conv)', 'raw', 'conv', '', 'conv'))
        for fw in fws: vs.append((f'{fw} (conv)', fw, 'conv', '', 'conv'))
        if args.base and 'fastcb' in fws: vs.append(('fastcb@base (conv)', 'fastcb', 'conv', '', 'conv', args.base))
    return vs

def med(xs): return statistics.median(xs) if xs else float('nan')

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--worker'); ap.add_argument('--task', default='mlp'); ap.add_argument('--extra', default='')
    ap.add_argument('--warmup', type=int, default=2, help='untimed epochs per variant first')
    ap.add_argument('--batches', type=int, default=None, help='training batches per epoch (default: 300 MLP, 40 conv)')
    ap.add_argument('--rounds', type=int, default=15, help='epochs timed per variant (interleaved)')
    ap.add_argument('--quick', action='store_true', help='5 rounds, fewer batches')
    ap.add_argument('--frameworks', default='fastcb,fastai,lightning,ignite')
    ap.add_argument('--no-conv', action='store_true'); ap.add_argument('--no-mlp', action='store_true')
    ap.add_argument('--profile', action='store_true',
                    help='also time fastcb with profile_callbacks() on')
    ap.add_argument('--json', help='also write the results to this file')
    ap.add_argument('--base', help='a checkout of another fastcb version (e.g. `git worktree add /tmp/base <rev>`): '
                                   'its variants run beside this one\'s, as `fastcb@base`')
    ap.add_argument('--root', help=argparse.SUPPRESS)  # worker: where to import fastcb from
    args = ap.parse_args()
    if args.worker:
        args.batches = args.batches or (300 if args.task == 'mlp' else 40)
        return worker_main(args)

    if args.quick: args.rounds = min(args.rounds, 5)
    nb = {'mlp': args.batches or (100 if args.quick else 300), 'conv': args.batches or (15 if args.quick else 40)}
    sys.path.insert(0, ROOT)
    args.frameworks = args.frameworks.split(',')
    skipped = [f for f in args.frameworks if f != 'fastcb' and not available(f)]
    args.frameworks = [f for f in args.frameworks if f not in skipped]
    workers, notes = [], [f"{f}: not importable, skipped" for f in skipped]
    for v in variants(args):
        name, fw, task, extra, group = v[:5]
        w = Worker(name, fw, task, extra, nb[task], *v[5:6])
        w.group, w.fw, w.extra = group, fw, extra
        workers.append(w)
    live = []
    for w in workers:
        if w.ready(): live.append(w)
        else:
            w.close(); notes.append(f"{w.name}: skipped ({w.error})")
    for r in range(args.warmup + args.rounds):
        k = r % len(live)
        for w in live[k:] + live[:k]:  # rotate the order each round
            try: w.run_epoch(record=r >= args.warmup)
            except RuntimeError as e:
                if w.fw == 'raw': raise
                live.remove(w); w.close(); notes.append(f"{w.name}: dropped ({e})")
    for w in live: w.close()

    raws = {w.group: w for w in live if w.fw == 'raw'}
    rows = []
    for w in live:
        ref, n = raws[w.group], nb[w.group]
        row = {'variant': w.name, 'us_per_batch': med(w.times) / n * 1e6,
               'ratio': med([a / b for a, b in zip(w.times, ref.times)]),  # per round: same machine state
               'ratio_wall': med([a / b for a, b in zip(w.walls, ref.walls)])}
        if 'cbs' in w.extra:
            base = next((o for o in live if o.fw == w.fw and o.group == w.group and o.extra == ''
                         and o.name.startswith(w.name.split(' ')[0] + ' ')), None)
            calls = w.info.get('calls_per_cb')
            if base is not None and calls:
                row['ns_per_cb_call'] = med([(a - b) for a, b in zip(w.times, base.times)]) / (N_CBS * calls) * 1e9
                row['calls_per_cb_per_epoch'] = calls
        rows.append(row)

    print(machine_line('loop_overhead.py') + ', 1 torch thread')
    print(f"# {args.rounds} interleaved epochs per variant (+{args.warmup} warm-up); an epoch = {nb['mlp']} MLP "
          f"(or {nb['conv']} conv) training batches of 64 + {max(1, nb['mlp']//5)} (or {max(1, nb['conv']//5)}) "
          f"validation batches; medians; CPU time of each process (wall-clock ratio for reference)")
    print()
    print(f"| {'variant':42} | {'µs / batch':>10} | {'time / raw loop':>15} | {'wall / raw loop':>15} | {'ns / callback call':>18} |")
    print(f"|{'-'*44}|{'-'*11}:|{'-'*16}:|{'-'*16}:|{'-'*19}:|")
    for r in rows:
        ns = f"{r['ns_per_cb_call']:.0f}" if 'ns_per_cb_call' in r else ''
        print(f"| {r['variant']:42} | {r['us_per_batch']:10.1f} | {r['ratio']:14.3f}x | {r['ratio_wall']:14.3f}x | {ns:>18} |")
    print("\n(µs / batch: epoch time / training batches, so it includes the validation batches' share)")
    for n in notes: print(f"note: {n}")
    if args.json:
        with open(args.json, 'w') as f: json.dump({'rows': rows, 'notes': notes, 'rounds': args.rounds, 'batches': nb,
                                                   'cpu_times': {w.name: w.times for w in live}, 'wall_times': {w.name: w.walls for w in live}}, f, indent=1)

if __name__ == '__main__': main()
