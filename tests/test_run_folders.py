"""What train.py does with its folders and data before and around training: another run's
files, a second run at once, pictures that cannot be written, data that cannot train, and
signals at any moment."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from test_checkpoints import run_in
from test_train import TINY

from conftest import ROOT


def exit_message(*args, **kwargs):
    with pytest.raises(SystemExit) as error:
        run_in(*args, **kwargs)
    return str(error.value)


def test_a_fresh_run_refuses_folders_of_another_run(tmp_path, two_epochs, two_images):
    shutil.copytree(two_epochs, tmp_path, dirs_exist_ok=True)
    assert exit_message(tmp_path, two_images, '--max-epoch', '1') == (
        f'train.py: {tmp_path / "models"} holds another run (checkpoint_000000002, '
        'checkpoint_000000004): continue it with --resume, or delete its files with --overwrite'
    )
    shutil.rmtree(tmp_path / 'models')
    assert exit_message(tmp_path, two_images, '--max-epoch', '1') == (
        f'train.py: {tmp_path / "monitor"} holds another run (Arguments.txt, '
        'context_preserving_loss_x.series.txt, ...): continue it with --resume, or '
        'delete its files with --overwrite'
    )
    assert sorted(os.listdir(tmp_path / 'monitor')) == sorted(os.listdir(two_epochs / 'monitor'))


def test_overwrite_deletes_only_the_earlier_runs_files(tmp_path, two_epochs, two_images):
    shutil.copytree(two_epochs, tmp_path, dirs_exist_ok=True)
    (tmp_path / 'monitor' / 'notes.txt').write_text('mine')
    (tmp_path / 'models' / 'checkpoint_good').mkdir()
    run_in(tmp_path, two_images, '--max-epoch', '1', '--overwrite', '--log-step', '1')
    assert sorted(os.listdir(tmp_path / 'models')) == ['checkpoint_000000002', 'checkpoint_good']
    monitor = sorted(os.listdir(tmp_path / 'monitor'))
    assert 'notes.txt' in monitor and 'translation_x2y_epoch_0002.png' not in monitor
    assert 'translation_x2y_epoch_0001.png' in monitor
    series = np.loadtxt(tmp_path / 'monitor' / 'generator_loss_x.series.txt', ndmin=2)
    assert list(series[:, 0]) == [0, 1]


def write_lock(folder, pid):
    folder.mkdir(parents=True)
    (folder / 'train.lock').write_text(json.dumps({'pid': pid, 'host': socket.gethostname()}))


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(tmp_path, two_images, caplog):
    write_lock(tmp_path / 'monitor', os.getppid())
    assert exit_message(tmp_path, two_images, '--max-epoch', '1') == (
        f'train.py: {tmp_path / "monitor"} is in use by another run (pid '
        f'{os.getppid()}); wait for it to end or choose other folders'
    )
    assert not (tmp_path / 'models' / 'train.lock').exists()  # taken first, released
    finished = subprocess.Popen(['true'])
    finished.wait()
    (tmp_path / 'monitor' / 'train.lock').unlink()
    (tmp_path / 'models').rmdir()
    write_lock(tmp_path / 'models', finished.pid)
    run_in(tmp_path, two_images, '--max-epoch', '1')
    assert (
        f'{tmp_path / "models"}: taking over the lock of pid {finished.pid}, which no '
        'longer runs (no process has that pid now)' in caplog.messages
    )
    assert not (tmp_path / 'monitor' / 'train.lock').exists()
    assert not (tmp_path / 'models' / 'train.lock').exists()


def test_an_unreadable_old_lock_refuses(tmp_path, two_images):
    (tmp_path / 'models').mkdir()
    lock = tmp_path / 'models' / 'train.lock'
    lock.write_text('')
    os.utime(lock, (time.time() - 60,) * 2)
    assert exit_message(tmp_path, two_images, '--max-epoch', '1') == (
        f'train.py: {tmp_path / "models"} is locked by {lock}, which names no process; delete '
        'it if no run uses the folder'
    )


@pytest.mark.parametrize('picture', ['translation_x2y_epoch_0001', 'losses'])
def test_pictures_that_cannot_be_written_cost_nothing_else(
    tmp_path, two_images, caplog, monkeypatch, picture
):
    real_fsync = os.fsync

    def disk_full(descriptor):  # full when this picture is written, not before
        if picture in os.readlink(f'/proc/self/fd/{descriptor}'):
            raise OSError(28, 'No space left on device')
        real_fsync(descriptor)

    monkeypatch.setattr(os, 'fsync', disk_full)
    run_in(tmp_path, two_images, '--max-epoch', '1')
    path = tmp_path / 'monitor' / f'{picture}.png'
    assert (
        f'epoch 1: pictures not written (WriteFailed: could not write {path} (No space left '
        'on device))' in caplog.messages
    )
    assert os.listdir(tmp_path / 'models') == ['checkpoint_000000002']
    assert not [name for name in os.listdir(tmp_path / 'monitor') if '.partial' in name]
    assert not (tmp_path / 'monitor' / 'losses.png').exists()
    assert not path.exists()


def test_a_domain_whose_masks_are_all_empty_is_refused(tmp_path, two_images):
    data = tmp_path / 'data'
    shutil.copytree(two_images, data)
    for mask in (data / 'trainB_seg').iterdir():
        Image.new('L', Image.open(mask).size).save(mask)
    assert exit_message(tmp_path, data, '--max-epoch', '1') == (
        f'train.py: {data}/trainB_seg: every mask is empty, so {data}/trainB has no instance to translate'
    )
    assert not (tmp_path / 'models').exists() and not (tmp_path / 'monitor').exists()


def test_a_corrupt_image_deep_in_the_epoch_stops_the_run_before_anything_is_written(tmp_path, dataset):
    images = sorted((dataset / 'trainB').iterdir())
    last = images[np.random.RandomState(1).permutation(len(images))[-1]]  # y reads with seed 1
    last.write_bytes(last.read_bytes()[:300])
    message = exit_message(tmp_path, dataset, '--max-epoch', '1')
    assert message.startswith(f'train.py: {last}: unreadable image (')
    assert not (tmp_path / 'models').exists() and not (tmp_path / 'monitor').exists()


def as_from_a_terminal():
    """Undo an ignored SIGINT inherited from a shell's background job, which train.py keeps."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(tmp_path, dataroot, *flags, preexec_fn=as_from_a_terminal):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'train.py')]
        + TINY
        + [
            '--dataroot',
            str(dataroot),
            '--monitor-path',
            str(tmp_path / 'monitor'),
            '--model-save-path',
            str(tmp_path / 'models'),
        ]
        + list(flags),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec_fn,
    )


def wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.02)


def last_line(process, signum):
    _, stderr = process.communicate(timeout=120)
    assert 'Traceback' not in stderr, stderr
    assert process.returncode == 128 + signum, stderr
    return stderr.strip().splitlines()[-1]


def signals(process, kind):
    """The signals the process catches (kind 'SigCgt') or ignores ('SigIgn')."""
    with open(f'/proc/{process.pid}/status') as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith(kind + ':'))
    return {signum for signum in signal.Signals if mask >> (signum - 1) & 1}


def test_a_signal_while_starting_ends_with_one_line(tmp_path, two_images):
    importing = start(tmp_path / 'first', two_images, '--max-epoch', '50')
    while signal.SIGTERM not in signals(importing, 'SigCgt'):  # the first lines ran
        assert importing.poll() is None
        time.sleep(0.005)
    importing.send_signal(signal.SIGINT)
    assert last_line(importing, signal.SIGINT) == 'train.py: stopped by SIGINT'
    locked = start(tmp_path / 'second', two_images, '--max-epoch', '50')
    wait_for(tmp_path / 'second' / 'models' / 'train.lock', locked)
    locked.send_signal(signal.SIGTERM)
    assert last_line(locked, signal.SIGTERM) == 'train.py: stopped by SIGTERM'
    assert not (tmp_path / 'second' / 'models' / 'train.lock').exists()


def test_a_background_jobs_ignored_sigint_stays_ignored(tmp_path, two_images):
    process = start(
        tmp_path,
        two_images,
        '--max-epoch',
        '50',
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    wait_for(tmp_path / 'models' / 'train.lock', process)
    assert signal.SIGINT in signals(process, 'SigIgn')
    assert signal.SIGTERM in signals(process, 'SigCgt')
    process.send_signal(signal.SIGTERM)
    assert last_line(process, signal.SIGTERM) == 'train.py: stopped by SIGTERM'


def test_a_second_run_is_refused_and_a_second_signal_stops_at_once(tmp_path, two_images):
    process = start(tmp_path, two_images, '--max-epoch', '200')
    wait_for(tmp_path / 'models' / 'checkpoint_000000002', process)
    assert exit_message(tmp_path, two_images, '--max-epoch', '200', '--resume') == (
        f'train.py: {tmp_path / "models"} is in use by another run (pid '
        f'{process.pid}); wait for it to end or choose other folders'
    )
    assert (tmp_path / 'models' / 'train.lock').exists()  # the refused run left it alone
    process.send_signal(signal.SIGINT)
    # Two signals before Python's handler runs count as one: wait for the first to be taken.
    while 'SIGINT: saving a checkpoint after this iteration' not in process.stderr.readline():
        assert process.poll() is None
    process.send_signal(signal.SIGINT)
    assert last_line(process, signal.SIGINT) == (
        'train.py: stopped by SIGINT; the checkpoints written so far are kept (continue with --resume)'
    )
    assert not (tmp_path / 'models' / 'train.lock').exists()


def test_a_signal_while_the_lock_is_written_leaves_no_lock(tmp_path):
    """SIGTERM lands between the creation of train.lock and the end of its write (a slow disk's
    fsync): the run ends with one line and removes the lock, whole by then."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {ROOT!r})
import runtime.run

def slow_create(path, data):
    with open(path, 'wb'):
        pass
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the bytes are written
    with open(path, 'wb') as f:
        f.write(data)

runtime.run.create_exclusive = slow_create
folder = {str(tmp_path / 'models')!r}
with runtime.run.Run({{'-o': folder}}, folder, runtime.run.run_files([])):
    print('not stopped')
"""
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert result.stderr.strip().splitlines()[-1] == '-c: stopped by SIGTERM'
    assert os.listdir(tmp_path / 'models') == []
