"""Memory per process and step time of fully sharded training: 1 vs 2 processes, DDP vs FSDP, on the CPU (gloo).

    python bench/fsdp.py [--blocks 8] [--width 512] [--bs 64] [--steps 30] [--repeat 2]

Every configuration trains the same stack of residual MLP blocks with AdamW, through `Learner.distrib_ctx(strategy=...)`,
with the same global batch (`--bs`: 1 process x bs, or 2 processes x bs/2). Each process counts what it holds after an
optimizer step: its parameters, their gradients and the optimizer state (bytes of the local tensors: a `DTensor`'s
slice under FSDP), and times its training batches; the median batch time after a warm-up is reported, best of
`--repeat` runs (a shared machine makes the others noisy). The 2-process runs use torchrun on one machine, so the step
time shows the communication cost on 2 CPU cores, not a speed-up. Never run as a test: no assertions.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


def worker(args):
    "One process of one configuration: train `--steps` batches, count the bytes held, time the batches"
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    sys.path.insert(0, str(ROOT))
    from fastcb.core import Callback
    from fastcb.learner import Learner, DataLoaders
    import fastcb.fsdp  # noqa: F401
    torch.set_num_threads(1)
    ws = int(os.environ.get('WORLD_SIZE', 1))

    class Block(nn.Module):
        def __init__(self, w): super().__init__(); self.lin,self.norm = nn.Linear(w, w),nn.LayerNorm(w)
        def forward(self, x): return self.norm(x + self.lin(x).relu())

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, args.width), *[Block(args.width) for _ in range(args.blocks)], nn.Linear(args.width, 10))
    g = torch.Generator().manual_seed(0)
    n = args.bs * (args.steps + 5)
    x = torch.randn(n, 64, generator=g); y = (x @ torch.randn(64, 10, generator=g)).argmax(1)
    dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=args.bs // ws), DataLoader(TensorDataset(x[:64], y[:64]), batch_size=64),
                      device='cpu')
    nbytes = lambda t: (t.to_local() if hasattr(t, 'to_local') else t).numel() * t.element_size()
    res = {}

    class Probe(Callback):
        order = 90
        def before_batch(self): self.t0 = time.perf_counter()
        def after_step(self):
            if 'params' in res: return
            ps = list(self.learn.model.parameters())
            res['params'] = sum(nbytes(p) for p in ps)
            res['grads'] = sum(nbytes(p.grad) for p in ps if p.grad is not None)
            res['opt'] = sum(nbytes(v) for st in self.learn.opt.state.values() for v in st.values() if torch.is_tensor(v))
        def after_batch(self): res.setdefault('times', []).append(time.perf_counter() - self.t0)

    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.AdamW, lr=1e-3, cbs=Probe())
    learn.remove_cb(learn.get_cb('ProgressCallback')) if learn.get_cb('ProgressCallback') else None
    learn.logger = lambda *a, **k: None
    kw = dict(strategy=args.strategy) if ws > 1 else {}
    if args.strategy == 'fsdp' and ws > 1: kw['wrap'] = Block
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()), learn.distrib_ctx(**kw): learn.fit(1)
    res['total_params'] = sum(p.numel() for p in model.parameters())
    res['step_ms'] = statistics.median(res.pop('times')[5:]) * 1e3
    if int(os.environ.get('RANK', 0)) == 0: Path(args.out).write_text(json.dumps(res))


def run(strategy, ws, args):
    "Run one configuration in fresh processes; its figures (rank 0's)"
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)/'res.json'
        sub = ['--worker', '--strategy', strategy, '--out', str(out), '--blocks', str(args.blocks), '--width', str(args.width),
               '--bs', str(args.bs), '--steps', str(args.steps)]
        if ws == 1: cmd = [sys.executable, str(HERE), *sub]
        else: cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(ws), str(HERE), *sub]
        env = {**os.environ, 'OMP_NUM_THREADS': '1'}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if p.returncode: raise RuntimeError(f"{strategy} x{ws} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        return json.loads(out.read_text())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--worker', action='store_true'); ap.add_argument('--out'); ap.add_argument('--strategy', default='ddp')
    ap.add_argument('--blocks', type=int, default=8); ap.add_argument('--width', type=int, default=512)
    ap.add_argument('--bs', type=int, default=64); ap.add_argument('--steps', type=int, default=30)
    ap.add_argument('--repeat', type=int, default=2)
    args = ap.parse_args()
    if args.worker: return worker(args)
    import torch
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s); {args.blocks} blocks of width {args.width}, AdamW, "
          f"global batch {args.bs}, median of {args.steps - 5} batches, best of {args.repeat}")
    mb = lambda b: f"{b / 2**20:8.2f}"
    print(f"{'configuration':<16}{'params MB':>10}{'grads MB':>10}{'optim MB':>10}{'total MB':>10}{'step ms':>10}")
    for strategy, ws in [('ddp', 1), ('ddp', 2), ('fsdp', 2)]:
        runs = [run(strategy, ws, args) for _ in range(args.repeat)]
        r = min(runs, key=lambda o: o['step_ms'])
        tot = r['params'] + r['grads'] + r['opt']
        name = 'one process' if ws == 1 else f"{strategy.upper()} x{ws}"
        print(f"{name:<16}{mb(r['params']):>10}{mb(r['grads']):>10}{mb(r['opt']):>10}{mb(tot):>10}{r['step_ms']:>10.1f}")
    print(f"(per process; {r['total_params']:,} parameters in all)")


if __name__ == '__main__': main()
