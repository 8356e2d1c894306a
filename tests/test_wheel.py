"""`pip install fastcb` as a user meets it: `python -m build` makes a wheel and an sdist; the wheel carries the license, the
README as long description, the version of settings.ini and `python_requires`, and no notebooks or tests; installed into
a fresh virtualenv that already has torch and gets the newest fastcore 2.x (no nbdev, no fastcore 1.x), it imports
`fastcb.all` without pulling in heavy optional modules and trains the digits model for one epoch.

torch (and scikit-learn, which the digits data needs) come from this interpreter's install through a `.pth` file in
the new venv that points at links to exactly those distributions and their dependencies, so the test takes seconds
instead of reinstalling 800 MB; everything else in the venv is what pip installs from the wheel. The figure reported
(in the warnings summary, and with `-rP`/`-s`): the time `import fastcb.all` adds after `import torch`, the best of 3
fresh processes. It is reported, not asserted (timings are never asserted in tests); the assertion is that the import
pulls in none of the heavy optional modules, which is what keeps it fast."""
import configparser, email, importlib.metadata as md, importlib.util, json, os, re, shutil, subprocess, sys
import tarfile, warnings, zipfile
from pathlib import Path
import pytest
from conftest import shared_dir

pytestmark = pytest.mark.slow  # a wheel build and a fresh virtualenv: ~40 s

root = Path(__file__).resolve().parent.parent
cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(root/'settings.ini')
cfg = cfg['DEFAULT']
LIB, VERSION = cfg['lib_name'], cfg['version']
HEAVY = ('matplotlib', 'sklearn', 'scipy', 'pandas', 'fastprogress', 'IPython', 'nbdev', 'execnb', 'tensorboard',
         'torchmetrics', 'PIL', 'wandb', 'mlflow', 'fsspec', 's3fs')  # fastcb imports these lazily, inside the functions that use them

def run(cmd, timeout=600, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope='module')
def dist(tmp_path_factory):
    "The wheel and sdist `python -m build` makes (built once per test run)"
    if importlib.util.find_spec('build') is None: pytest.fail('the `build` package is missing: pip install build')
    with shared_dir(tmp_path_factory, 'dist') as (out, done):
        if not done:
            if out.exists(): shutil.rmtree(out)
            run([sys.executable, '-m', 'build', '--outdir', str(out), str(root)])
            (out/'.done').touch()
    whl, = out.glob('*.whl')
    sdist, = out.glob('*.tar.gz')
    return whl, sdist

def _metadata(whl):
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith('.dist-info/METADATA'))).decode()
    return names, email.message_from_string(meta)

def test_wheel_contents(dist):
    whl, sdist = dist
    names, meta = _metadata(whl)
    assert meta['Name'] == LIB and meta['Version'] == VERSION, (meta['Name'], meta['Version'])
    assert whl.name.startswith(f'{LIB}-{VERSION}-py3-none-any'), whl.name
    assert meta['Requires-Python'] == f">={cfg['min_python']}", meta['Requires-Python']
    assert meta['Description-Content-Type'] == 'text/markdown'
    assert meta.get_payload().strip() == (root/'README.md').read_text().strip(), 'long description is not README.md'
    lic = [n for n in names if re.search(r'\.dist-info/(licenses/)?LICENSE', n)]
    assert lic, f'no LICENSE in the wheel: {names}'
    with zipfile.ZipFile(whl) as z: assert 'Apache License' in z.read(lic[0]).decode()
    assert 'Apache' in (meta['License'] or meta['License-Expression'] or ''), meta['License']
    reqs = meta.get_all('Requires-Dist') or []
    assert any(r.startswith('torch') for r in reqs) and any(r.startswith('fastcore') for r in reqs), reqs
    assert not [r for r in reqs if 'nbdev' in r and 'extra ==' not in r], f'nbdev must not be a runtime dependency: {reqs}'
    bad = [n for n in names if n.endswith('.ipynb') or re.search(r'(^|/)(tests?|nbs)/|(^|/)test_[^/]*\.py$', n)]
    assert not bad, f'notebooks or tests in the wheel: {bad}'
    mods = {Path(n).stem for n in names if n.startswith(f'{LIB}/') and n.endswith('.py')}
    assert {'__init__', 'core', 'learner', 'all'} <= mods, mods
    with tarfile.open(sdist) as t: snames = t.getnames()
    for f in ('LICENSE', 'README.md', 'settings.ini', 'setup.py'):
        assert any(n.endswith(f'/{f}') and n.count('/') == 1 for n in snames), f'{f} missing from the sdist'
    bad = [n for n in snames if n.endswith('.ipynb') or re.search(r'/(tests|nbs)/', n)]
    assert not bad, f'notebooks or tests in the sdist: {bad}'

def _closure(*names):
    "Distributions `names` need at run time (no extras), recursively"
    from packaging.requirements import Requirement
    seen, todo = {}, list(names)
    while todo:
        n = todo.pop()
        key = re.sub(r'[-_.]+', '-', n).lower()
        if key in seen: continue
        d = md.distribution(n)
        seen[key] = d
        for r in d.requires or []:
            req = Requirement(r)
            if req.marker and not req.marker.evaluate({'extra': ''}): continue
            try: md.distribution(req.name)
            except md.PackageNotFoundError: continue  # an optional platform package (e.g. CUDA) that isn't installed
            todo.append(req.name)
    return seen

def _shim(dest, *names):
    "A folder linking the packages of `names` and their dependencies from this interpreter (dist-info copied, no RECORD)"
    dest.mkdir()
    for d in _closure(*names).values():
        base = Path(d.locate_file(''))
        tops = {Path(f).parts[0] for f in (d.files or []) if not str(f).startswith('..')}
        for t in tops:
            src = base/t
            if not src.exists() or (dest/t).exists(): continue
            if t.endswith('.dist-info'):  # a copy without RECORD: pip may read it but can never uninstall through it
                shutil.copytree(src, dest/t, ignore=shutil.ignore_patterns('RECORD', 'INSTALLER', 'direct_url.json'))
            else: (dest/t).symlink_to(src)
    return dest

def make_venv(whl, tmp):
    "A fresh venv: the preinstalled torch and scikit-learn, then `pip install <wheel> 'fastcore>=2,<3'`"
    env_dir = tmp/'venv'
    run([sys.executable, '-m', 'venv', str(env_dir)])
    py = env_dir/'bin'/'python'
    site = Path(run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).strip())
    shim = _shim(tmp/'preinstalled', 'torch', 'scikit-learn')
    (site/'_preinstalled_torch.pth').write_text(str(shim) + '\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(('PYTHON', 'VIRTUAL_ENV'))}
    env['PIP_DISABLE_PIP_VERSION_CHECK'] = '1'
    run([str(py), '-m', 'pip', 'install', '-q', str(whl), 'fastcore>=2,<3'], env=env, cwd=tmp)
    run([str(py), '-m', 'pip', 'check'], env=env, cwd=tmp)
    return dict(py=py, env=env, cwd=tmp)

def _py(v, code, timeout=300): return run([str(v['py']), '-c', code], env=v['env'], cwd=v['cwd'], timeout=timeout)

def test_install_in_fresh_venv(dist, tmp_path):
    "Install the wheel into a fresh venv (torch present, newest fastcore 2.x, no nbdev); import it; train one epoch"
    v = make_venv(dist[0], tmp_path)
    # fastcb comes from the wheel, with fastcore 2.x, the preinstalled torch, and no nbdev
    info = json.loads(_py(v, """
import json, importlib.util, fastcore, torch, fastcb
print(json.dumps(dict(fastcore=fastcore.__version__, torch=torch.__version__, fastcb=fastcb.__version__,
                      file=fastcb.__file__, nbdev=importlib.util.find_spec('nbdev') is not None)))"""))
    import torch
    assert info['fastcore'].startswith('2.'), info
    assert info['torch'] == torch.__version__, info
    assert info['fastcb'] == VERSION, info
    assert 'site-packages' in info['file'] and not info['file'].startswith(str(root)), info
    assert not info['nbdev'], 'nbdev is importable in the fresh venv'

    # `import fastcb.all` pulls in no heavy optional module; report the time it adds after `import torch`
    code = f"""
import json, sys, time
t0 = time.perf_counter(); import torch
t1 = time.perf_counter(); import fastcb.all
t2 = time.perf_counter()
print(json.dumps(dict(torch=t1 - t0, fastcb=t2 - t1, heavy=[m for m in {HEAVY!r} if m in sys.modules])))"""
    runs = [json.loads(_py(v, code)) for _ in range(3)]
    assert runs[0]['heavy'] == [], f"`import fastcb.all` imports {runs[0]['heavy']}: import them inside the functions that use them"
    best, each = min(r['fastcb'] for r in runs), ', '.join(f"{r['fastcb']:.3f}" for r in runs)
    fig = (f"import torch {min(r['torch'] for r in runs):.3f}s; import fastcb.all beyond torch {best:.3f}s "
           f"(best of 3 fresh processes: {each})")
    print(fig)

    # the installed package trains the digits model for one epoch
    out = _py(v, """
import math, torch
from fastcb.all import *
from fastcb.demo import digits_dls, digits_model
torch.manual_seed(0)
learn = Learner(digits_dls(), digits_model(), loss_func=torch.nn.CrossEntropyLoss(), lr=1e-2)
learn.fit(1)
vals = learn.recorder.values
assert len(vals) == 1 and all(math.isfinite(v) for v in vals[0]), vals
learn.model.eval()
with torch.no_grad(): x, y = next(iter(learn.dls.valid)); acc = (learn.model(x).argmax(-1) == y).float().mean().item()
print(f'ACC {acc:.4f}')
""")
    acc = float(re.search(r'ACC ([\d.]+)', out).group(1))
    print(f'digits, one epoch from the wheel: valid accuracy {acc:.3f}\n{out}')
    assert acc > 0.5, out
    warnings.warn(f'[info] {fig}; digits, one epoch: valid accuracy {acc:.3f}')  # shown under -q and xdist
