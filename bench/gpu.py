#!/usr/bin/env python
"""fastcb's loop on a GPU: time per batch against a hand-written PyTorch loop (and Lightning, ignite when importable),
and the host-device syncs per batch. Also runs on the CPU (`--device cpu`). See bench/README.md ("gpu.py: method").

Variants: the raw eager loop (plain `Adam`, the baseline), the raw loop with `Adam(fused=True)`, fastcb's defaults (its
optimizer is built fused), with the progress bar; from pinned CPU batches (CUDA only): the raw loop copying each batch
with `.to(device, non_blocking=True)`, fastcb with its device prefetch, and with it off; `learn.compile()` (inductor
unless `--compile-backend`), and with CUDA graphs (`mode='reduce-overhead'`, CUDA only); Lightning and ignite.
Models: a tiny launch-bound MLP, a small ResNet-like convnet, a small transformer encoder block.

    python bench/gpu.py                          # CUDA: every model and variant (a few minutes: compiling included)
    python bench/gpu.py --device cpu --quick     # smoke test on a CPU
    python bench/gpu.py --device cpu --no-compile --frameworks raw,fastcb   # CPU, fast
"""
from __future__ import annotations
from _machine import machine_line
import argparse, os, statistics, sys, time, warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------------- workloads
class Batches:
    "Pre-made batches, already on the device: the loop's own cost, with no loader or copy in any variant"
    def __init__(self, batches): self.batches = batches
    def __len__(self): return len(self.batches)
    def __iter__(self): return iter(self.batches)

class Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                               nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
    def forward(self, x): return torch.relu(x + self.f(x))

def convnet():
    "A small ResNet-like net for 3x32x32 images"
    def cbr(i, o, s=1): return [nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*cbr(3, 32), Res(32), *cbr(32, 64, 2), Res(64), *cbr(64, 128, 2), Res(128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))

class Block(nn.Module):
    "A small transformer encoder block over 32 tokens of width 64, mean-pooled into 10 classes"
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0., batch_first=True)
        self.head = nn.Linear(64, 10)
    def forward(self, x): return self.head(self.enc(x).mean(1))

MODELS = {'mlp': ((32,), lambda: nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))),
          'conv': ((3, 32, 32), convnet), 'transformer': ((32, 64), Block)}

def workload(kind, dev, n_train, bs):
    "(model factory, training batches, validation batches): a fifth as many validation batches"
    g = torch.Generator().manual_seed(0)
    shape,mk = MODELS[kind]
    def batches(n):
        return Batches([(torch.randn(bs, *shape, generator=g).to(dev), torch.randint(0, 10, (bs,), generator=g).to(dev))
                        for _ in range(n)])
    def mk_model():
        torch.manual_seed(0)
        return mk().to(dev)
    return mk_model, batches(n_train), batches(max(1, n_train//5))

class Timer:
    "Wall and CPU (this thread) seconds of one epoch; on CUDA, waits for the device at both ends (unless `on` is False)"
    def __init__(self, dev): self.cuda,self.on,self.t0,self.last = dev.type == 'cuda',True,None,None
    def _now(self):
        if self.cuda and self.on: torch.cuda.synchronize()
        return time.perf_counter(), time.thread_time()
    def start(self): self.t0 = self._now()
    def stop(self):
        if self.t0 is None: return
        t = self._now()
        self.last,self.t0 = (t[0] - self.t0[0], t[1] - self.t0[1]),None

# ----------------------------------------------------------------------------------------------------------- variants
# Each builds its learner/trainer and returns `epoch()`: one training epoch + validation (the mean loss), timed by `timer`.
class Skip(Exception): "A variant that cannot run here (it needs CUDA)"

def pinned(batches, dev):
    "The same batches on the CPU, in pinned memory (what a `DataLoader(pin_memory=True)` gives); CUDA only"
    if dev.type != 'cuda': raise Skip('needs CUDA (pinned CPU batches copied to the GPU)')
    return Batches([tuple(t.cpu().pin_memory() for t in b) for b in batches])

def v_raw(mk_model, train, valid, dev, timer, fused=False, cpu_batches=False):
    "What a PyTorch user writes, and no more (optionally with `Adam(fused=True)`, or from pinned CPU batches)"
    if cpu_batches: train,valid = pinned(train, dev),pinned(valid, dev)
    model,lf = mk_model(),nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **({'fused': True} if fused else {}))
    def epoch():
        timer.start()
        model.train()
        for xb,yb in train:
            xb,yb = xb.to(dev, non_blocking=True),yb.to(dev, non_blocking=True)
            loss = lf(model(xb), yb)
            loss.backward(); opt.step(); opt.zero_grad()
        model.eval()
        tot = torch.zeros((), device=dev)
        with torch.no_grad():
            for xb,yb in valid: tot += lf(model(xb.to(dev, non_blocking=True)), yb.to(dev, non_blocking=True))
        (tot/len(valid)).item()  # the one read of the epoch
        timer.stop()
    return epoch

def v_fastcb(mk_model, train, valid, dev, timer, bar=False, cpu_batches=False, prefetch=True, compile=None, args=None):
    "fastcb's defaults; with the progress bar drawn as in a terminal (into /dev/null); from pinned CPU batches; compiled"
    import fastcb.all  # noqa: F401
    from fastcb.learner import Learner, DataLoaders
    from fastcb.progress import ProgressCallback
    if cpu_batches: train,valid = pinned(train, dev),pinned(valid, dev)
    if compile is not None and compile.get('mode') == 'reduce-overhead' and dev.type != 'cuda': raise Skip('needs CUDA (CUDA graphs)')
    dls = DataLoaders(train, valid, device=dev, **({} if prefetch else {'prefetch': False}))
    learn = Learner(dls, mk_model(), nn.CrossEntropyLoss())
    if compile is not None: learn.compile(backend=args.compile_backend, **compile)
    learn.remove_cb(ProgressCallback)
    if bar: learn.add_cb(ProgressCallback(mode='tty', file=open(os.devnull, 'w')))
    else: learn.logger = lambda row: None
    def epoch():
        timer.start(); learn.fit(1); timer.stop()  # fit's set-up included
    return epoch

def v_lightning(mk_model, train, valid, dev, timer):
    "A `LightningModule`; one `trainer.fit` per epoch, timed from the epoch's start hook to the end of its validation"
    try: import lightning.pytorch as pl
    except ImportError: import pytorch_lightning as pl
    import logging
    for n in ('lightning', 'lightning.pytorch', 'pytorch_lightning'): logging.getLogger(n).setLevel(logging.ERROR)
    warnings.filterwarnings('ignore', module='(lightning|pytorch_lightning|torchmetrics)')
    lf = nn.CrossEntropyLoss()
    class Module(pl.LightningModule):
        def __init__(self): super().__init__(); self.model = mk_model()
        def training_step(self, b, i): return lf(self.model(b[0]), b[1])
        def validation_step(self, b, i): self.log('valid_loss', lf(self.model(b[0]), b[1]))
        def configure_optimizers(self): return torch.optim.Adam(self.parameters(), lr=1e-3)
    class Hook(pl.Callback):
        def on_train_epoch_start(self, *a): timer.start()
        def on_validation_epoch_end(self, *a): timer.stop()
    trainer = pl.Trainer(accelerator='gpu' if dev.type == 'cuda' else 'cpu', devices=1, max_epochs=0, logger=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         enable_progress_bar=False, callbacks=[Hook()])
    module = Module()
    def epoch():
        trainer.fit_loop.max_epochs += 1
        trainer.fit(module, train, valid)
    return epoch

def v_ignite(mk_model, train, valid, dev, timer):
    "ignite's supervised trainer and an evaluator computing `Loss`; timed from EPOCH_STARTED to the evaluator's end"
    from ignite.engine import Events, create_supervised_trainer, create_supervised_evaluator
    from ignite.metrics import Loss
    model,lf = mk_model(),nn.CrossEntropyLoss()
    trainer = create_supervised_trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), lf, device=dev)
    evaluator = create_supervised_evaluator(model, metrics={'loss': Loss(lf)}, device=dev)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: timer.start())
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: (evaluator.run(valid), timer.stop()))
    def epoch(): trainer.run(train, max_epochs=trainer.state.epoch + 1 if trainer.state.epoch else 1)
    return epoch

VARIANTS = [('raw loop', v_raw, {}), ('raw fused Adam', v_raw, {'fused': True}), ('fastcb', v_fastcb, {}),
            ('fastcb + progress bar', v_fastcb, {'bar': True}),
            ('raw, pinned CPU batches', v_raw, {'cpu_batches': True}),
            ('fastcb + prefetch, pinned CPU', v_fastcb, {'cpu_batches': True}),
            ('fastcb, pinned CPU, no prefetch', v_fastcb, {'cpu_batches': True, 'prefetch': False}),
            ('fastcb compiled', v_fastcb, {'compile': {}}),
            ('fastcb compiled + CUDA graphs', v_fastcb, {'compile': {'mode': 'reduce-overhead'}}),
            ('lightning', v_lightning, {}), ('ignite', v_ignite, {})]

# ------------------------------------------------------------------------------------------------------------- driver
def count_syncs(epoch, timer):
    "Host-device syncs in one epoch, from torch's own detector (CUDA only)"
    timer.on = False
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try: epoch()
        finally: torch.cuda.set_sync_debug_mode('default')
    timer.on = True
    return sum('synchroniz' in str(w.message) for w in ws)

def batch_size(kind, args): return {'mlp': 64, 'conv': args.conv_bs, 'transformer': args.tf_bs}[kind]

def bench(kind, dev, args):
    n = {'mlp': args.batches, 'conv': args.conv_batches, 'transformer': args.tf_batches}[kind]
    mk_model,train,valid = workload(kind, dev, n, batch_size(kind, args))
    live,notes = [],[]
    for name,f,kw in VARIANTS:
        if args.frameworks and name.split()[0].rstrip(',') not in args.frameworks: continue
        if args.no_compile and 'compile' in kw: continue
        if 'compile' in kw: kw = {**kw, 'args': args}
        timer = Timer(dev)
        try: ep = f(mk_model, train, valid, dev, timer, **kw)
        except ImportError as e: notes.append(f'{name}: not importable ({e}), skipped'); continue
        except Skip as e: notes.append(f'{name}: {e}, skipped on {dev.type}'); continue
        for _ in range(args.warmup): ep()
        live.append(dict(name=name, epoch=ep, timer=timer, times=[],
                         syncs=count_syncs(ep, timer) if dev.type == 'cuda' else None))
    for r in range(args.rounds):  # interleaved, in a rotating order: every variant sees the same machine noise
        for v in live[r % len(live):] + live[:r % len(live)]:
            v['epoch'](); v['times'].append(v['timer'].last)
    raw = next(v for v in live if v['name'] == 'raw loop')
    rows = []
    for v in live:
        wall = [t[0]/b[0] for t,b in zip(v['times'], raw['times'])]
        cpu = [t[1]/b[1] for t,b in zip(v['times'], raw['times'])]
        us = statistics.median(t[0] for t in v['times'])/len(train)*1e6
        syn = '' if v['syncs'] is None else f"{v['syncs']} ({v['syncs']/(len(train)+len(valid)):.2f})"
        rows.append(f"| {v['name']+f' ({kind})':<44} | {us:10.1f} | {statistics.median(wall):14.3f}x | "
                    f"{statistics.median(cpu):13.3f}x | {syn:>28} |")
    return rows, notes, len(train), len(valid)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--device', default='cuda', help="'cuda' (default), 'cuda:1', 'cpu'...")
    ap.add_argument('--rounds', type=int, default=7, help='timed epochs per variant, interleaved')
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--batches', type=int, default=300, help='MLP training batches per epoch (batch 64)')
    ap.add_argument('--conv-batches', type=int, default=None, help='convnet training batches per epoch (default 40; 4 on a CPU)')
    ap.add_argument('--conv-bs', type=int, default=None, help='convnet batch size (default 256; 32 on a CPU)')
    ap.add_argument('--frameworks', default='', help='comma-separated subset of raw,fastcb,lightning,ignite (raw is always run)')
    ap.add_argument('--tf-batches', type=int, default=None, help='transformer training batches per epoch (default 40; 4 on a CPU)')
    ap.add_argument('--tf-bs', type=int, default=None, help='transformer batch size (default 128; 16 on a CPU)')
    ap.add_argument('--compile-backend', default='inductor', help="torch.compile backend of the compiled variants")
    ap.add_argument('--no-compile', action='store_true', help='leave out the compiled variants (inductor compiles for minutes on a small CPU)')
    ap.add_argument('--no-conv', action='store_true'); ap.add_argument('--no-mlp', action='store_true')
    ap.add_argument('--no-transformer', action='store_true')
    ap.add_argument('--quick', action='store_true', help='3 rounds, 1 warm-up, 60 MLP batches')
    args = ap.parse_args()
    dev = torch.device(args.device)
    cpu = dev.type == 'cpu'
    if args.quick: args.rounds,args.warmup,args.batches = 3,1,60
    if args.conv_batches is None: args.conv_batches = 4 if cpu else 40
    if args.conv_bs is None: args.conv_bs = 32 if cpu else 256
    if args.tf_batches is None: args.tf_batches = 4 if cpu else 40
    if args.tf_bs is None: args.tf_bs = 16 if cpu else 128
    args.frameworks = set(['raw', *args.frameworks.split(',')]) if args.frameworks else None
    if cpu: torch.set_num_threads(1)
    else: torch.backends.cudnn.benchmark = True
    print(machine_line('gpu.py') + (f", {torch.cuda.get_device_name(dev)}" if dev.type == 'cuda' else ', 1 torch thread'))
    print(f"# device {dev}; batches made on the device beforehand; {args.rounds} interleaved epochs per variant "
          f"(+{args.warmup} warm-up), medians; an epoch = training batches + a fifth as many validation batches")
    print(f"\n| {'variant':<44} | µs / batch | wall / raw loop | CPU / raw loop | host syncs / epoch (/ batch) |")
    print(f"|{'-'*46}|-----------:|----------------:|---------------:|-----------------------------:|")
    notes = []
    for kind in [k for k,off in (('mlp', args.no_mlp), ('conv', args.no_conv), ('transformer', args.no_transformer)) if not off]:
        rows,ns,nt,nv = bench(kind, dev, args)
        print('\n'.join(rows), flush=True)
        notes += [f'{kind}: {nt} training + {nv} validation batches of {batch_size(kind, args)} per epoch'] + ns
    print('\n(µs / batch: median epoch wall time / training batches, validation included; CPU: this thread\'s CPU time '
          '(on a GPU it includes the waits for the device, which spin); syncs: torch.cuda.set_sync_debug_mode(\'warn\') '
          'in one more epoch, the timer\'s own syncs off)')
    for n in dict.fromkeys(notes): print('note:', n)

if __name__ == '__main__': main()
