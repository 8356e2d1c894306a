"""Training throughput of 1 vs 2 processes on the CPU: fastcb's `distrib_ctx` against a hand-written PyTorch DDP loop.

    python bench/distributed.py [--epochs 5] [--items 4096] [--bs 128] [--repeat 3]

Each configuration runs in fresh processes (2-process runs via torchrun, gloo backend). Every run trains the same MLP on
the same synthetic data with SGD and the same global batch size (`--bs`: 1 process x bs, or 2 processes x bs/2), and
reports training samples per second of its fastest epoch after the first (warm-up); each configuration runs `--repeat`
times, raw and fastcb alternately, and the best run is shown: a shared machine makes the others noisy.
Never run as a test: no assertions.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


def _data(n, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    y = (x @ torch.randn(64, 10, generator=g)).argmax(1)
    return x, y


def _model():
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def worker(args):
    "One process of one configuration: train, time the epochs, write the figures (rank 0)"
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    if args.threads: torch.set_num_threads(args.threads)
    ws = int(os.environ.get('WORLD_SIZE', 1))
    x, y = _data(args.n)
    bs = args.bs // ws
    times = []
    if args.impl == 'raw':
        import torch.distributed as dist
        from torch.utils.data import DistributedSampler
        from torch.nn.parallel import DistributedDataParallel as DDP
        model, ddp = _model(), ws > 1
        if ddp:
            dist.init_process_group('gloo')
            sampler = DistributedSampler(TensorDataset(x, y), shuffle=True, seed=0)
            dl = DataLoader(TensorDataset(x, y), batch_size=bs, sampler=sampler)
            net = DDP(model)
        else: dl, net = DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True), model
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loss_func = nn.CrossEntropyLoss()
        for epoch in range(args.epochs):
            if ddp: sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            net.train()
            for xb, yb in dl:
                loss = loss_func(net(xb), yb)
                loss.backward()
                opt.step()
                opt.zero_grad()
            times.append(time.perf_counter() - t0)
        if ddp: dist.destroy_process_group()
    else:
        sys.path.insert(0, str(ROOT))
        from fastcb.learner import Learner, DataLoaders
        from fastcb.core import Callback
        import fastcb.distributed  # noqa: F401  (Learner.distrib_ctx)
        dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=bs, shuffle=True), device='cpu')
        clock = {}
        timer = Callback(before_epoch=lambda self: clock.__setitem__('t0', time.perf_counter()),
                         after_epoch=lambda self: times.append(time.perf_counter() - clock['t0']))
        learn = Learner(dls, _model(), loss_func=nn.CrossEntropyLoss(), opt_func=torch.optim.SGD, lr=0.01, cbs=timer)
        learn.logger = lambda row: None
        if ws > 1:
            with learn.distrib_ctx(): learn.fit(args.epochs)
        else: learn.fit(args.epochs)
    if int(os.environ.get('RANK', 0)) == 0:
        n_items = len(x)
        Path(args.out).write_text(json.dumps({'times': times, 'samples_per_s': n_items/min(times[1:])}))


def run(impl, nproc, threads, args):
    "Run one configuration in fresh processes; its samples/s"
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)/'res.json'
        wargs = ['--worker', '--impl', impl, '--epochs', str(args.epochs), '--items', str(args.n), '--bs', str(args.bs),
                 '--threads', str(threads), '--out', str(out)]
        env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
        if nproc == 1: cmd = [sys.executable, str(HERE), *wargs]
        else:
            torchrun = Path(sys.executable).parent/'torchrun'
            cmd = [str(torchrun), '--standalone', '--nproc_per_node', str(nproc), str(HERE), *wargs]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        if r.returncode != 0: raise RuntimeError(f"{impl} x{nproc} failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        return json.loads(out.read_text())['samples_per_s']


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--epochs', type=int, default=5)
    p.add_argument('--items', dest='n', type=int, default=4096, help='training items')
    p.add_argument('--bs', type=int, default=128, help='global batch size (split over the processes)')
    p.add_argument('--repeat', type=int, default=3, help='runs of each configuration (the best is shown)')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--impl', default='fastcb', help=argparse.SUPPRESS)
    p.add_argument('--threads', type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument('--out', default='', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker: return worker(args)
    import torch
    ncpu = os.cpu_count()
    print(f"torch {torch.__version__}, {ncpu} CPU cores; MLP 64-512-512-10, {args.n} items, global batch {args.bs}, "
          f"SGD, {args.epochs} epochs (best after the first); training samples/s")
    confs = [('1 process, all cores', 1, ncpu), ('1 process, 1 thread', 1, 1),
             (f'2 processes x 1 thread (gloo)', 2, 1)]
    print(f"{'configuration':36} {'raw PyTorch':>12} {'fastcb':>10} {'fastcb/raw':>11}")
    for name, nproc, threads in confs:
        raw, fcb = 0., 0.
        for _ in range(args.repeat):  # alternate, keep the best: a busy machine slows down whichever runs at that moment
            raw = max(raw, run('raw', nproc, threads, args))
            fcb = max(fcb, run('fastcb', nproc, threads, args))
        print(f"{name:36} {raw:12,.0f} {fcb:10,.0f} {fcb/raw:11.2f}")


if __name__ == '__main__': main()
