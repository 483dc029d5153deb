"""The training script end to end on the bundled sample at a tiny size, and its pieces."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import matplotlib
import matplotlib.pyplot
import numpy as np
import pytest
from nnabla.monitor import plot_series, plot_time_elapsed

import data
import runtime.files
import train
from conftest import ROOT

SAMPLE = os.path.join(ROOT, 'datasets', 'ccp_sample')
TINY = [
    '--dataroot',
    SAMPLE,
    '--loadSizeH',
    '40',
    '--loadSizeW',
    '28',
    '--fineSizeH',
    '32',
    '--fineSizeW',
    '24',
    '--ngf',
    '4',
    '--ndf',
    '4',
    '--n-blocks',
    '1',
    '--log-step',
    '4',
    '--save-interval',
    '1',
    '--lr-decay-start-epoch',
    '1',
]
SERIES = [f'{name}_{d}' for name in train.LOSS_NAMES for d in 'xy']


def run(tmp_path, *extra):
    train.main(
        TINY
        + ['--monitor-path', str(tmp_path / 'monitor'), '--model-save-path', str(tmp_path / 'models')]
        + list(extra)
    )


def read_series(tmp_path, name):
    return np.loadtxt(tmp_path / 'monitor' / f'{name}.series.txt', ndmin=2)


def test_learning_rate_is_the_official_schedule():
    """The official jeans<->skirt command: niter 400, niter_decay 200, epoch_count 1, and the
    factor 1 - max(0, epoch + epoch_count - niter) / (niter_decay + 1) for epochs 0, 1, ..."""
    rates = [train.learning_rate(2e-4, epoch, 400, 600) for epoch in range(600)]
    assert rates[0] == rates[399] == 2e-4
    assert rates[400] == pytest.approx(2e-4 * 200 / 201)
    assert rates[500] == pytest.approx(2e-4 * 100 / 201)
    assert rates[599] == pytest.approx(2e-4 / 201)
    assert all(later < earlier for earlier, later in zip(rates[399:], rates[400:]))


def test_image_pool_returns_new_fakes_until_full_then_mixes():
    pool = train.ImagePool(size=2, seed=0)
    first = np.zeros((2, 3, 1, 1)), np.zeros((2, 1, 1, 1))
    images, masks = pool.query(*first, active=[True, True])
    assert np.all(images == 0) and len(pool.images) == 2
    seen = set()
    for step in range(1, 30):
        images, _ = pool.query(np.full((1, 3, 1, 1), step), np.full((1, 1, 1, 1), step), [True])
        seen.add(float(images[0, 0, 0, 0]))
    assert 0.0 in seen and len(seen) > 3  # old fakes come back, new ones pass through
    # a sample without translated instances neither enters the pool nor takes a fake from it
    for _ in range(10):
        images, _ = pool.query(np.full((1, 3, 1, 1), -5.0), np.full((1, 1, 1, 1), -5.0), [False])
        assert images[0, 0, 0, 0] == -5.0
    assert -5.0 not in {float(image[0, 0, 0]) for image in pool.images}
    unpooled = train.ImagePool(size=0, seed=0)
    np.testing.assert_array_equal(unpooled.query(*first, active=[True, True])[0], first[0])


def test_two_epochs_write_curves_tiles_and_checkpoints(tmp_path):
    run(tmp_path, '--max-epoch', '2')
    monitor = tmp_path / 'monitor'
    iterations = 8  # 8 images in each domain of the sample, batch 1
    for name in SERIES:
        values = read_series(tmp_path, name)
        assert values.shape == (2 * iterations // 4, 2), name
        assert np.all(np.isfinite(values[:, 1])), name
    timer = np.loadtxt(monitor / 'elapsed_time.timer.txt', ndmin=2)  # MonitorTimeElapsed's
    assert timer.shape == (2 * iterations // 4, 4)
    assert list(timer[:, 0]) == [3, 7, 11, 15] and np.all(timer[:, 2] == 4)
    np.testing.assert_allclose(np.cumsum(timer[:, 1]), timer[:, 3], rtol=1e-4)
    assert (monitor / 'Arguments.txt').read_text().count('\n') == len(vars(train.get_args([])))
    # nnabla's own plotting reads both files (matplotlib off screen).
    matplotlib.use('Agg')
    plot_series(str(monitor / 'generator_loss_x.series.txt'))
    plot_time_elapsed(str(monitor / 'elapsed_time.timer.txt'), elapsed=True)
    assert [len(line.get_xdata()) for line in matplotlib.pyplot.gca().lines] == [4, 4]
    matplotlib.pyplot.close('all')
    assert (monitor / 'losses.png').stat().st_size > 0
    for epoch in [1, 2]:
        for direction in ['x2y', 'y2x']:
            assert (monitor / f'translation_{direction}_epoch_{epoch:04d}.png').exists()
        checkpoint = tmp_path / 'models' / f'checkpoint_{8 * epoch:09d}'
        names = {'parameters.h5', 'state.json', 'solver_states.npz', 'training_state.npz'}
        assert names <= set(os.listdir(checkpoint))
        assert json.loads((checkpoint / 'state.json').read_text())['epoch'] == epoch
    assert not [n for n in os.listdir(tmp_path / 'models') if n.startswith('.')]


def test_resume_continues_at_the_next_epoch(tmp_path):
    run(tmp_path, '--max-epoch', '1')
    before = read_series(tmp_path, 'generator_loss_x')
    run(tmp_path, '--max-epoch', '2', '--resume')
    after = read_series(tmp_path, 'generator_loss_x')
    np.testing.assert_array_equal(after[: len(before)], before)
    assert list(after[:, 0]) == [3, 7, 11, 15]
    assert (tmp_path / 'models' / 'checkpoint_000000016').exists()


def test_resume_refuses_other_network_sizes(tmp_path):
    run(tmp_path, '--max-epoch', '1')
    with pytest.raises(SystemExit) as error:
        run(tmp_path, '--max-epoch', '2', '--resume', '--ngf', '8')
    assert 'made with --ngf 4, not 8' in str(error.value)


def read_all_series(tmp_path):
    return {name: read_series(tmp_path, name) for name in SERIES}


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    # log-step 3 does not divide the 8 iterations of an epoch: the resumed run must also carry
    # the partly averaged monitor buffers over.
    run(tmp_path / 'whole', '--max-epoch', '3', '--log-step', '3')
    run(tmp_path / 'parts', '--max-epoch', '1', '--log-step', '3')
    run(tmp_path / 'parts', '--max-epoch', '3', '--log-step', '3', '--resume')
    whole, parts = read_all_series(tmp_path / 'whole'), read_all_series(tmp_path / 'parts')
    for name in SERIES:
        assert parts[name].shape == whole[name].shape == (8, 2), name
        np.testing.assert_allclose(parts[name], whole[name], rtol=1e-5, err_msg=name)


def test_keeps_only_the_newest_checkpoints(tmp_path):
    run(tmp_path, '--max-epoch', '3', '--keep-checkpoints', '2')
    assert sorted(os.listdir(tmp_path / 'models')) == ['checkpoint_000000016', 'checkpoint_000000024']


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_next = data.MaskedImageIterator.next
    calls = []

    def next_with_nan(self):
        images, masks = real_next(self)
        calls.append(None)
        if len(calls) > 2 * 10:  # both domains draw once per iteration: from iteration 10 on
            images[:] = np.nan
        return images, masks

    monkeypatch.setattr(data.MaskedImageIterator, 'next', next_with_nan)
    with pytest.raises(SystemExit) as error:
        run(tmp_path, '--max-epoch', '3')
    assert str(error.value) == (
        'train.py: generator_loss_x is nan at iteration 10; stopped before updating with it'
    )
    assert os.listdir(tmp_path / 'models') == ['checkpoint_000000008']


def test_failed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    run(tmp_path, '--max-epoch', '1')
    real_fsync = os.fsync

    def disk_full(descriptor):  # the models folder's disk is full once the run has its lock
        if str(tmp_path / 'models' / '.checkpoint_') in os.readlink(f'/proc/self/fd/{descriptor}'):
            raise OSError(28, 'No space left on device')
        real_fsync(descriptor)

    monkeypatch.setattr(runtime.files.os, 'fsync', disk_full)
    with pytest.raises(SystemExit) as error:
        run(tmp_path, '--max-epoch', '2', '--resume')
    monkeypatch.undo()
    assert str(error.value) == (
        'train.py: could not write the checkpoint of iteration 16 in {} (No space left on '
        'device); the earlier ones are intact'.format(tmp_path / 'models')
    )
    assert os.listdir(tmp_path / 'models') == ['checkpoint_000000008']
    run(tmp_path, '--max-epoch', '2', '--resume')
    assert 'checkpoint_000000016' in os.listdir(tmp_path / 'models')


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_resumable_checkpoint(tmp_path, signum):
    command = (
        [sys.executable, os.path.join(ROOT, 'train.py')]
        + TINY
        + [
            '--max-epoch',
            '100',
            '--monitor-path',
            str(tmp_path / 'monitor'),
            '--model-save-path',
            str(tmp_path / 'models'),
        ]
    )
    # A shell's background job ignores SIGINT, and train.py keeps it so: undo that here.
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while not (tmp_path / 'models' / 'checkpoint_000000008').exists():
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.1)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum
    last_line = stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        rf'train\.py: {signal.Signals(signum).name} at iteration (\d+): saved '
        r'(\S+); continue with --resume',
        last_line,
    )
    assert match, last_line
    iteration = int(match.group(1))
    assert iteration > 8
    assert match.group(2) == str(tmp_path / 'models' / f'checkpoint_{iteration:09d}')
    run(tmp_path, '--max-epoch', str(iteration // 8 + 1), '--resume')
    assert f'checkpoint_{8 * (iteration // 8 + 1):09d}' in os.listdir(tmp_path / 'models')
