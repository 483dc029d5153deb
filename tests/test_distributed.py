"""Data parallelism on the CPU under `mpiexec -n 2` (mpi4py and mpich's wheel, dev requirements):
the ranks agree, two ranks of batch 1 train as one process of batch 2, rank 0 alone writes,
and a fault on one rank ends both."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from test_train import TINY

from conftest import ROOT

MPIEXEC = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
STEPS = os.path.join(ROOT, 'tests', 'mpi_steps.py')
EXACT = TINY + ['--pool-size', '0', '--cpu-conv', 'nnabla']


def steps(out, processes, batch, count=4, env=None):
    out.mkdir()
    command = [sys.executable, STEPS, str(out), str(count)] + EXACT + ['--batch-size', str(batch)]
    if processes > 1:
        command = [MPIEXEC, '-n', str(processes)] + command
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {}))
    )
    return result, {path.stem: np.load(path) for path in out.glob('rank_*.npz')}


def test_two_ranks_of_batch_one_train_as_one_process_of_batch_two(tmp_path):
    """Compared: the losses of each step (the mean over the global batch), the generators'
    outputs on a fixed input after 4 steps, and every parameter across the two ranks. Not
    compared across the two set-ups: the 17 biases that feed an instance norm. Their true
    gradient is zero (the norm removes any constant per channel), so their gradients are float
    noise, which Adam scales into full-size steps that differ with the summation order; they
    change no output."""
    result, one = steps(tmp_path / 'one', 1, 2)
    assert result.returncode == 0, result.stderr
    result, two = steps(tmp_path / 'two', 2, 1)
    assert result.returncode == 0, result.stderr
    ranks = two['rank_0'], two['rank_1']
    assert all(np.array_equal(ranks[0][key], ranks[1][key]) for key in ranks[0].files)
    single = one['rank_0']
    np.testing.assert_allclose(ranks[0]['losses'], single['losses'], atol=1e-4)
    for key in single.files:
        if key.startswith('generator'):
            np.testing.assert_allclose(ranks[0][key], single[key], atol=1e-4, err_msg=key)


def test_a_nan_on_one_rank_stops_both(tmp_path):
    result, _ = steps(tmp_path / 'nan', 2, 1, env={'NAN_RANK': '1'})
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    # mpiexec merges the two ranks' stderr, so their lines are looked for, not split apart.
    for line in [
        'rank 0: a loss of another rank is not finite at iteration 1; stopped before updating with it',
        'rank 1: generator_loss_x is nan at iteration 1; stopped before updating with it',
    ]:
        assert line in result.stderr, result.stderr


def launch(tmp_path, *flags, processes=2):
    return subprocess.Popen(
        [MPIEXEC, '-n', str(processes), sys.executable, os.path.join(ROOT, 'train.py')]
        + TINY
        + ['--monitor-path', str(tmp_path / 'monitor'), '--model-save-path', str(tmp_path / 'models')]
        + list(flags),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def ranks_of(launcher):
    """{rank: pid} of the python processes mpiexec started."""
    found = {}
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open(f'/proc/{pid}/environ', 'rb') as f:
                environ = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                command = f.read()
        except OSError:
            continue
        if (
            b'train.py' in command
            and b'PMI_RANK' in environ
            and str(tmp_path_of(launcher)).encode() in command
        ):
            found[int(environ[b'PMI_RANK'])] = int(pid)
    return found


def tmp_path_of(launcher):
    return launcher.args[launcher.args.index('--monitor-path') + 1]


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.1)


def test_only_rank_0_writes_and_a_resume_under_two_continues_a_single_run(tmp_path):
    single = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'train.py')]
        + TINY
        + [
            '--max-epoch',
            '1',
            '--monitor-path',
            str(tmp_path / 'monitor'),
            '--model-save-path',
            str(tmp_path / 'models'),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    written = set(os.listdir(tmp_path / 'monitor'))
    process = launch(tmp_path, '--max-epoch', '2', '--resume', processes=2)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert (
        '--resume: 2 processes continue a checkpoint of 1: the data order goes on, the '
        'pools of ranks other than 0 start empty' in stderr
    )
    # 8 images a domain, batch 1 a rank: epoch 2 is 4 iterations of the global batch of 2.
    assert sorted(os.listdir(tmp_path / 'models')) == ['checkpoint_000000008', 'checkpoint_000000012']
    assert set(os.listdir(tmp_path / 'monitor')) == written | {
        'translation_x2y_epoch_0002.png',
        'translation_y2x_epoch_0002.png',
    }
    series = np.loadtxt(tmp_path / 'monitor' / 'generator_loss_x.series.txt', ndmin=2)
    assert list(series[:, 0]) == [3, 7, 11]  # one line each, not one per rank
    assert sorted(os.listdir(tmp_path)) == ['models', 'monitor']


def test_killing_one_rank_ends_the_other_with_a_clear_line(tmp_path):
    process = launch(tmp_path, '--max-epoch', '500')
    wait_for(tmp_path / 'models' / 'checkpoint_000000004', process)
    pids = ranks_of(process)
    assert sorted(pids) == [0, 1]
    os.kill(pids[1], signal.SIGKILL)
    started = time.time()
    stdout, stderr = process.communicate(timeout=30)
    assert time.time() - started < 30
    assert process.returncode != 0
    # mpiexec (mpich's hydra) ends the other rank at once and names the dead one, on stdout.
    assert 'BAD TERMINATION' in stdout and 'EXIT CODE: 9' in stdout, stdout + stderr
    assert all(not os.path.exists(f'/proc/{pid}') for pid in pids.values())


@pytest.mark.parametrize('rank', [0, 1])
def test_sigterm_on_one_rank_checkpoints_and_stops_both(tmp_path, rank):
    process = launch(tmp_path, '--max-epoch', '500')
    wait_for(tmp_path / 'models' / 'checkpoint_000000004', process)
    os.kill(ranks_of(process)[rank], signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and 'Traceback' not in stderr
    stops = re.findall(
        r'train\.py: (SIGTERM|a stop on another rank) at iteration (\d+): saved '
        r'(.+); continue with --resume',
        stderr,
    )
    assert sorted(what for what, _, _ in stops) == ['SIGTERM', 'a stop on another rank']
    iteration = int(stops[0][1])
    assert stops[0][1] == stops[1][1]
    assert os.path.isdir(tmp_path / 'models' / f'checkpoint_{iteration:09d}')
    assert not os.path.exists(tmp_path / 'models' / 'train.lock')
