"""The README's test command stops when asked. Ctrl-C (SIGINT to the terminal's foreground process group) and SIGTERM
(what `timeout`, CI runners and job schedulers send to it) end it within seconds, and nothing it started is left
running: not the notebook workers of `nbdev_test`, not pytest, not a `torchrun` launcher nor its workers (which run in
sessions of their own and never see the terminal's signal; `conftest.process_tree` ends them).

Each test starts the command in a process group of its own, with a marker in its environment that every process it
starts inherits, waits until the part under test is running, signals the group as a terminal or `timeout` would, and
then looks in /proc for any process still carrying the marker."""
import os, re, signal, subprocess, sys, time, uuid
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = 'FASTCB_STOP_PROBE'
STOP_WITHIN = 10  # seconds
pytestmark = pytest.mark.skipif(MARK in os.environ, reason='already inside a stop probe')


def readme_test_command():
    "The README's second command without its install step (`pip install ... && `): what runs the suite"
    blocks = re.findall(r"```sh\n(.*?)\n```", (ROOT/'README.md').read_text(), re.S)
    cmd = blocks[1].strip().split('&&', 1)[1].strip()
    assert ' pytest' in cmd and cmd.endswith(' tests'), cmd
    return cmd


def _procs(token):
    "{pid: command line} of the live processes whose environment carries the marker `token`"
    res = {}
    for d in Path('/proc').glob('[0-9]*'):
        try:
            if f'{MARK}={token}'.encode() in (d/'environ').read_bytes().split(b'\0'):
                res[int(d.name)] = (d/'cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace').strip()
        except OSError: pass
    return res


def stop_probe(cmd, ready, sig, tmp_path, settle=0, start_timeout=120):
    "Run `cmd`, send `sig` to its group `settle` s after `ready(procs)`; returns (seconds to stop, processes left, output)"
    token, log = uuid.uuid4().hex, tmp_path/'out.log'
    env = {**os.environ, MARK: token, 'PYTHONUNBUFFERED': '1'}
    env.pop('PYTEST_ADDOPTS', None)
    with open(log, 'w') as out:
        p = subprocess.Popen(['bash', '-c', cmd], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout
        while not ready(_procs(token)):
            if p.poll() is not None: pytest.fail(f'`{cmd}` ended (rc {p.returncode}) before it was signalled:\n{log.read_text()[-3000:]}')
            if time.monotonic() > deadline: pytest.fail(f'`{cmd}` not ready after {start_timeout}s:\n{log.read_text()[-3000:]}')
            time.sleep(0.2)
        time.sleep(settle)
        t0 = time.monotonic()
        os.killpg(p.pid, sig)
        try: p.wait(timeout=STOP_WITHIN)
        except subprocess.TimeoutExpired: pass
        secs = time.monotonic() - t0
        while _procs(token) and time.monotonic() - t0 < STOP_WITHIN: time.sleep(0.2)  # let the last ones exit
        return secs, _procs(token), log.read_text()
    finally:
        for pid in _procs(token):
            try: os.kill(pid, signal.SIGKILL)
            except OSError: pass
        if p.poll() is None: p.kill(); p.wait()


def _count(word, n):
    "A `ready` test: at least `n` marked processes have `word` in their command line"
    return lambda procs: sum(word in c for c in procs.values()) >= n


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'Ctrl-C'])
def test_stops_while_running_notebooks(sig, tmp_path):
    "Signalled while its 2 workers run notebooks"
    from test_notebooks import TAG
    cmd = f'{readme_test_command()}/test_notebooks.py -p no:cacheprovider --basetemp {tmp_path/"bt"}'
    secs, left, out = stop_probe(cmd, _count(TAG.strip(), 2), sig, tmp_path, settle=3)  # the workers are inside notebooks
    assert secs < STOP_WITHIN and not left, f'{secs:.1f}s after the signal these still run: {left}\n{out[-2000:]}'


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'Ctrl-C'])
def test_stops_while_torchrun_runs(sig, tmp_path):
    "Signalled while torchrun's launcher and its 2 workers (each in a session of its own) train"
    cmd = f'{readme_test_command()}/test_distributed.py -p no:cacheprovider --basetemp {tmp_path/"bt"}'
    secs, left, out = stop_probe(cmd, _count('job.py', 3), sig, tmp_path)
    assert secs < STOP_WITHIN and not left, f'{secs:.1f}s after the signal these still run: {left}\n{out[-2000:]}'
