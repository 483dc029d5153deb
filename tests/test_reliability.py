"""Nothing lost, nothing silently wrong: every failure of the programs' surroundings ends in one
line and a non-zero exit, or in the right result. Full disks are real small file systems
(tmpfs, mounted as root) and, so that the same code paths are tested everywhere, failures
injected at the write calls."""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import nnabla as nn
import pytest
from PIL import Image
from test_checkpoints import run_in
from test_data import save_example
from test_evaluate import left_and_right
from test_train import SERIES, TINY
from test_translate import noise, rectangle, save_generators

import evaluate
import models
import runtime.device
import runtime.files
import train
import translate
from conftest import ROOT
from runtime.device import cuda_installed
from runtime.processes import boot_id, start_time, this_process
from runtime.run import FolderInUse, FolderLock

TRAIN = os.path.join(ROOT, 'train.py')
NO_SPACE = 'No space left on device'


@pytest.fixture
def small_disk(tmp_path):
    """mount(name, size): a tmpfs of `size` (as mount's size=) at tmp_path/name, unmounted
    after the test."""
    mounted = []

    def mount(name, size):
        if os.geteuid() != 0:
            pytest.skip('mounting a small file system needs root')
        path = tmp_path / name
        path.mkdir()
        result = subprocess.run(
            ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True, text=True
        )
        if result.returncode:
            pytest.skip(f'mount -t tmpfs is not permitted here: {result.stderr.strip()}')
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(['umount', str(path)], check=True)


def fill(disk):
    """Take every byte left on the file system of `disk`."""
    with open(disk / 'filler', 'wb', buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError as error:
            assert error.errno == errno.ENOSPC


def train_cli(dataroot, monitor, models, *flags):
    """train.py in a process of its own: a crash (a segfault) must not end the test session."""
    return subprocess.run(
        [sys.executable, TRAIN]
        + TINY
        + ['--dataroot', str(dataroot), '--monitor-path', str(monitor), '--model-save-path', str(models)]
        + list(flags),
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_line(result, program='train.py'):
    """The one line a refused or failed run ends with, exit status 1 and no traceback."""
    assert result.returncode == 1, result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f'{program}: '), result.stderr
    return line


def left_behind(*folders):
    """Locks and half-written files left in the folders."""
    return sorted(
        name
        for folder in folders
        if folder.exists()
        for name in os.listdir(folder)
        if name == 'train.lock' or '.partial' in name
    )


def snapshot(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def exit_message(*args, **kwargs):
    with pytest.raises(SystemExit) as error:
        run_in(*args, **kwargs)
    return str(error.value)


def fail_writes(monkeypatch, fragment, after=0):
    """Make runtime.files' writes to paths containing `fragment` fail as on a full disk, after
    `after` successful ones: half the bytes reach the file, then ENOSPC."""
    real_open = open
    writes = []

    class HalfWritten:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            writes.append(self.file.name)
            if len(writes) <= after:
                return self.file.write(data)
            self.file.write(data[: len(data) // 2])
            self.file.flush()
            raise OSError(errno.ENOSPC, NO_SPACE)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.file.close()

    def failing_open(path, mode='r', *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return HalfWritten(file) if fragment in str(path) and 'r' not in mode else file

    monkeypatch.setattr(runtime.files, 'open', failing_open, raising=False)
    return writes


def fail_fsync(monkeypatch, fragment):
    """Make fsync fail as on a full disk for the files whose path contains `fragment`."""
    real_fsync = os.fsync

    def disk_full(descriptor):
        if fragment in os.readlink(f'/proc/self/fd/{descriptor}'):
            raise OSError(errno.ENOSPC, NO_SPACE)
        real_fsync(descriptor)

    monkeypatch.setattr(runtime.files.os, 'fsync', disk_full)


# 2. --resume into another run's monitor folder ------------------------------------------------


def test_resume_into_another_runs_monitor_folder_is_refused(tmp_path, two_images):
    for run in 'AB':
        train_args = [
            '--max-epoch',
            '1',
            '--monitor-path',
            str(tmp_path / f'm{run}'),
            '--model-save-path',
            str(tmp_path / f'o{run}'),
        ]
        run_in(tmp_path, two_images, *train_args)
    before = snapshot(tmp_path / 'mA')
    assert exit_message(
        tmp_path,
        two_images,
        '--max-epoch',
        '2',
        '--resume',
        '--monitor-path',
        str(tmp_path / 'mA'),
        '--model-save-path',
        str(tmp_path / 'oB'),
    ) == (
        f'train.py: --resume: {tmp_path}/oB/checkpoint_000000002 and --monitor-path '
        f'{tmp_path}/mA belong to different runs; give the monitor path of the run it continues'
    )
    assert snapshot(tmp_path / 'mA') == before
    assert left_behind(tmp_path / 'mA', tmp_path / 'oB') == []


# 3. A full disk while a checkpoint is written --------------------------------------------------


def test_a_full_disk_while_a_checkpoint_is_written(tmp_path, two_images, small_disk):
    """One checkpoint of TINY takes 2.2 MB: the second does not fit beside the first."""
    disk = small_disk('disk', '3000k')
    monitor, models = tmp_path / 'monitor', disk / 'models'
    result = train_cli(two_images, monitor, models, '--max-epoch', '2')
    assert one_line(result) == (
        f'train.py: could not write the checkpoint of iteration 4 in {models} ({NO_SPACE}); '
        'the earlier ones are intact'
    )
    assert os.listdir(models) == ['checkpoint_000000002']
    assert left_behind(monitor, models) == []
    fill(disk)
    result = train_cli(two_images, monitor, models, '--max-epoch', '2', '--resume')
    assert one_line(result) == f'train.py: could not write {models}/train.lock ({NO_SPACE})'
    assert left_behind(monitor, models) == []
    os.remove(disk / 'filler')
    result = train_cli(two_images, monitor, models, '--max-epoch', '2', '--resume')
    assert one_line(result) == (
        f'train.py: could not write the checkpoint of iteration 4 in {models} ({NO_SPACE}); '
        'the earlier ones are intact'
    )
    assert os.listdir(models) == ['checkpoint_000000002']


@pytest.mark.parametrize('failing', ['write', 'fsync'])
def test_a_checkpoint_write_that_fails_leaves_the_earlier_ones(tmp_path, two_images, monkeypatch, failing):
    run_in(tmp_path, two_images, '--max-epoch', '1')
    models = tmp_path / 'models'
    checkpoint_files = str(models / '.checkpoint_')  # not the lock: the writes, after it
    if failing == 'write':
        fail_writes(monkeypatch, checkpoint_files)
    else:
        fail_fsync(monkeypatch, checkpoint_files)
    assert exit_message(tmp_path, two_images, '--max-epoch', '2', '--resume') == (
        f'train.py: could not write the checkpoint of iteration 4 in {models} ({NO_SPACE}); '
        'the earlier ones are intact'
    )
    assert os.listdir(models) == ['checkpoint_000000002']
    assert left_behind(tmp_path / 'monitor', models) == []
    monkeypatch.undo()
    run_in(tmp_path, two_images, '--max-epoch', '2', '--resume')
    assert sorted(os.listdir(models)) == ['checkpoint_000000002', 'checkpoint_000000004']


# 4. A full disk while the lock is written, and while a loss series is appended -----------------


def test_a_full_disk_while_the_lock_is_written(tmp_path, two_images, small_disk):
    disk = small_disk('disk', '64k')
    (disk / 'monitor').mkdir()
    fill(disk)
    result = train_cli(two_images, disk / 'monitor', tmp_path / 'models', '--max-epoch', '1')
    assert one_line(result) == f'train.py: could not write {disk}/monitor/train.lock ({NO_SPACE})'
    # the lock of --model-save-path, taken first, is released too
    assert left_behind(disk / 'monitor', tmp_path / 'models') == []


def test_a_lock_that_cannot_be_written_is_removed(tmp_path, two_images, monkeypatch):
    fail_fsync(monkeypatch, str(tmp_path / 'monitor' / 'train.lock'))
    assert exit_message(tmp_path, two_images, '--max-epoch', '1') == (
        f'train.py: could not write {tmp_path}/monitor/train.lock ({NO_SPACE})'
    )
    assert left_behind(tmp_path / 'monitor', tmp_path / 'models') == []


def series_lines(monitor):
    return {
        path.name: [int(line.split()[0]) for line in path.read_text().splitlines()]
        for path in monitor.glob('*.txt')
        if path.name != 'Arguments.txt'
    }


def test_a_full_disk_while_a_loss_series_is_appended(tmp_path, two_images, small_disk):
    """An epoch is two iterations, a series line every four: the first lines (iteration 3)
    come after the first checkpoint, in the second epoch, and do not fit."""
    disk = small_disk('disk', '32k')
    monitor, models = disk / 'monitor', tmp_path / 'models'
    result = train_cli(two_images, monitor, models, '--max-epoch', '4')
    line = one_line(result)
    assert re.fullmatch(
        rf'train\.py: could not write {monitor}/\w+\.(series|timer)\.txt \({NO_SPACE}\); '
        rf'stopped at iteration 3; {models}/checkpoint_000000002 is intact: continue from it '
        r'with --resume',
        line,
    ), line
    assert os.listdir(models) == ['checkpoint_000000002']  # none after the failed line
    assert left_behind(monitor, models) == []
    subprocess.run(['mount', '-o', 'remount,size=1m', str(disk)], check=True)
    result = train_cli(two_images, monitor, models, '--max-epoch', '4', '--resume')
    assert result.returncode == 0, result.stderr
    lines = series_lines(monitor)
    assert sorted(lines) == sorted([f'{name}.series.txt' for name in SERIES] + ['elapsed_time.timer.txt'])
    assert all(iterations == [3, 7] for iterations in lines.values()), lines


def test_a_failed_append_leaves_no_half_line_and_no_checkpoint(tmp_path, two_images, monkeypatch):
    writes = fail_writes(monkeypatch, 'generator_loss_y.series.txt', after=1)
    assert exit_message(tmp_path, two_images, '--max-epoch', '4') == (
        f'train.py: could not write {tmp_path}/monitor/generator_loss_y.series.txt ({NO_SPACE}); '
        f'stopped at iteration 7; {tmp_path}/models/checkpoint_000000006 is intact: continue '
        'from it with --resume'
    )
    assert len(writes) == 2
    series = tmp_path / 'monitor' / 'generator_loss_y.series.txt'
    assert series.read_text().endswith('\n') and series.read_text().count('\n') == 1
    assert sorted(os.listdir(tmp_path / 'models'))[-1] == 'checkpoint_000000006'
    assert left_behind(tmp_path / 'monitor', tmp_path / 'models') == []
    monkeypatch.undo()
    run_in(tmp_path, two_images, '--max-epoch', '4', '--resume')
    assert all(iterations == [3, 7] for iterations in series_lines(tmp_path / 'monitor').values())


# 11. Locks of killed runs, of other machines and of reused pids --------------------------------


def write_lock(folder, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / 'train.lock'
    lock.write_text(json.dumps({**this_process(), **changes}))
    return lock


def test_the_lock_names_host_pid_boot_and_start_time(tmp_path):
    with FolderLock(str(tmp_path)):
        held = json.loads((tmp_path / 'train.lock').read_text())
    assert held == {
        'pid': os.getpid(),
        'host': socket.gethostname(),
        'boot_id': boot_id(),
        'start_time': start_time(os.getpid()),
    }
    assert held['boot_id'] and held['start_time']
    assert not (tmp_path / 'train.lock').exists()


@pytest.mark.parametrize(
    'changes, reason',
    [
        ({'boot_id': '00000000-0000-0000-0000-000000000000'}, 'the machine has restarted since'),
        ({'pid': os.getppid(), 'start_time': 1}, f'pid {os.getppid()} is now another process'),
    ],
)
def test_a_lock_of_an_earlier_boot_or_a_reused_pid_is_taken_over(tmp_path, caplog, changes, reason):
    lock = write_lock(tmp_path, **changes)
    with FolderLock(str(tmp_path)):
        assert json.loads(lock.read_text()) == this_process()
    pid = changes.get('pid', os.getpid())
    assert (
        f'{tmp_path}: taking over the lock of pid {pid}, which no longer runs ({reason})' in caplog.messages
    )


def test_a_lock_of_a_running_process_is_kept(tmp_path):
    lock = write_lock(tmp_path, pid=os.getppid(), start_time=start_time(os.getppid()))
    with pytest.raises(
        FolderInUse,
        match=re.escape(
            f'{tmp_path} is in use by another run (pid {os.getppid()}); wait for it to '
            'end or choose other folders'
        ),
    ):
        FolderLock(str(tmp_path)).__enter__()
    assert json.loads(lock.read_text())['pid'] == os.getppid()


def test_a_lock_of_another_host_says_how_to_clear_it(tmp_path, two_images):
    lock = write_lock(tmp_path / 'models', host='gpu-7', pid=1)
    assert exit_message(tmp_path, two_images, '--max-epoch', '1') == (
        f'train.py: {tmp_path}/models is locked by a run on gpu-7 (pid 1); if no run '
        f'on gpu-7 uses the folder, delete {lock}'
    )
    assert json.loads(lock.read_text())['host'] == 'gpu-7'
    lock.unlink()
    run_in(tmp_path, two_images, '--max-epoch', '1')


# 5. translate.py --out and evaluate.py --out on a full disk -----------------------------------


@pytest.fixture
def restore_context():
    """translate.main and evaluate.main set the default context for the whole process."""
    context = nn.get_current_context()
    yield
    nn.set_default_context(context)


def test_translate_on_a_full_disk_names_the_file_and_stops(tmp_path, small_disk, restore_context):
    """Three noise photos of 96x72 (20 kB each as PNG, and as much again at full size)."""
    out = small_disk('disk', '64k') / 'out'
    params = save_generators(tmp_path / 'model')
    root = tmp_path / 'photos'
    for i, name in enumerate('abc'):
        save_example(root, 'testA', name, noise(i), [rectangle(20, 10, 40, 30)])
    with pytest.raises(SystemExit) as error:
        translate.main(['--params', str(params), '--dataroot', str(root), '--out', str(out)])
    message = str(error.value)
    assert re.fullmatch(
        rf'translate\.py: could not write {out}/[abc](_\w+)?\.png \({NO_SPACE}\); '
        r'stopped after [012] of 3 inputs',
        message,
    ), message
    written = sorted(os.listdir(out))
    assert written and not [name for name in written if '.partial' in name]
    assert all(Image.open(out / name).load() is not None for name in written)


def test_evaluate_on_a_full_disk_names_the_file_and_stops(tmp_path, small_disk, restore_context):
    out = small_disk('disk', '16k') / 'out'
    model = save_generators(tmp_path / 'model').parent
    left_and_right(tmp_path / 'data', 'train', 6)
    left_and_right(tmp_path / 'data', 'test', 3)
    with pytest.raises(SystemExit) as error:
        evaluate.main(
            ['--model-save-path', str(model), '--dataroot', str(tmp_path / 'data'), '--out', str(out)]
        )
    message = str(error.value)
    assert re.fullmatch(
        rf'evaluate\.py: could not write {out}/(AtoB|BtoA)_\d+\.png '
        rf'\({NO_SPACE}\)',
        message,
    ), message
    written = os.listdir(out)
    assert written and not [name for name in written if '.partial' in name]


# 7. Output folders inside a dataset -----------------------------------------------------------


@pytest.mark.parametrize(
    'flag, inside, what',
    [
        ('--monitor-path', 'trainB_seg', "is a dataset's mask folder"),
        ('--model-save-path', 'testA_seg/x', "lies in {data}/testA_seg, which is a dataset's mask folder"),
        (
            '--monitor-path',
            'trainA/run',
            "lies in {data}/trainA, which is a dataset's image folder (beside {data}/trainA_seg)",
        ),
    ],
)
def test_train_refuses_output_folders_in_a_dataset(tmp_path, two_images, flag, inside, what):
    data = tmp_path / 'data'
    shutil.copytree(two_images, data)
    (data / 'testA_seg').mkdir()
    before = snapshot_tree(data)
    assert exit_message(tmp_path, data, flag, str(data / inside)) == (
        f'train.py: {flag} {data / inside} {what.format(data=data)}; choose another folder'
    )
    assert snapshot_tree(data) == before
    assert not (tmp_path / 'models').exists() and not (tmp_path / 'monitor').exists()


def snapshot_tree(folder):
    return {path: path.read_bytes() if path.is_file() else None for path in folder.rglob('*')}


@pytest.mark.parametrize('inside', ['trainA_seg', 'testA_seg/x', 'testB'])
def test_translate_and_evaluate_refuse_an_out_in_a_dataset(tmp_path, restore_context, inside):
    model = save_generators(tmp_path / 'model')
    data = tmp_path / 'data'
    left_and_right(data, 'train', 6)
    left_and_right(data, 'test', 3)
    before = snapshot_tree(data)
    out = data / inside
    folder, what = (
        (data / inside.split('/')[0]),
        "a dataset's mask folder"
        if '_seg' in inside
        else f"a dataset's image folder (beside {data / inside}_seg)",
    )
    where = '' if folder == out else f' lies in {folder}, which'
    for program, argv in [
        (translate, ['--params', str(model), '--dataroot', str(data)]),
        (evaluate, ['--model-save-path', str(model.parent), '--dataroot', str(data)]),
    ]:
        with pytest.raises(SystemExit) as error:
            program.main(argv + ['--out', str(out)])
        name = program.__name__
        assert str(error.value) == f'{name}.py: --out {out}{where} is {what}; choose another folder'
    assert snapshot_tree(data) == before


# 10. Sizes the machine has no memory for --------------------------------------------------------


def test_the_parameter_counts_are_those_of_the_networks():
    for ngf, n_blocks, ndf, n_layers in [(4, 2, 4, 3), (8, 1, 12, 2)]:
        nn.clear_parameters()
        image, masks = nn.Variable((1, 3, 32, 24)), nn.Variable((1, 2, 32, 24))
        with nn.parameter_scope('g'):
            models.generator(image, masks, ngf, n_blocks)
        with nn.parameter_scope('d'):
            models.discriminator(image, masks, ndf, n_layers)
        counts = {
            scope: sum(
                p.size for name, p in nn.get_parameters(grad_only=False).items() if name.startswith(scope)
            )
            for scope in 'gd'
        }
        assert counts == {
            'g': models.generator_parameter_count(ngf, n_blocks),
            'd': models.discriminator_parameter_count(ndf, n_layers),
        }


def test_the_training_estimate_covers_the_measured_peak(tmp_path, two_images):
    # VmHWM, not ru_maxrss: Linux carries the forking process's peak over into ru_maxrss.
    script = (
        'import runpy, sys\n'
        f'sys.argv = {["train.py"] + TINY!r} + sys.argv[1:]\n'
        f'runpy.run_path({TRAIN!r}, run_name="__main__")\n'
        'print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")\n'
        '           if line.startswith("VmHWM:")))\n'
    )
    result = subprocess.run(
        [
            sys.executable,
            '-c',
            script,
            '--dataroot',
            str(two_images),
            '--max-epoch',
            '1',
            '--monitor-path',
            str(tmp_path / 'm'),
            '--model-save-path',
            str(tmp_path / 'o'),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.split()[-1])
    args = train.get_args(TINY)
    estimate = models.training_memory(args, 1)
    assert peak < estimate < 2 * peak, (peak, estimate)


def test_a_containers_memory_limit_counts_and_its_page_cache_does_not(tmp_path, monkeypatch):
    gib = 2**30
    (tmp_path / 'limit').write_text(f'{8 * gib}\n')
    (tmp_path / 'usage').write_text(f'{7 * gib}\n')
    (tmp_path / 'stat').write_text(f'active_file 5\ninactive_file {2 * gib}\n')
    (tmp_path / 'no_limit').write_text('max\n')
    files = [str(tmp_path / name) for name in ['limit', 'usage', 'stat']] + ['inactive_file']
    monkeypatch.setattr(runtime.device, 'CGROUP_MEMORY', [files])
    assert about(runtime.device.available_memory(), min(3 * gib, meminfo_available()))
    monkeypatch.setattr(runtime.device, 'CGROUP_MEMORY', [[str(tmp_path / 'no_limit')] + files[1:]])
    assert about(runtime.device.available_memory(), meminfo_available())


def meminfo_available():
    with open('/proc/meminfo') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable'))


def about(size, expected):
    """Equal but for what other processes took or gave back between the two readings."""
    return abs(size - expected) < 2**28


@pytest.fixture
def little_memory(monkeypatch):
    """The machine has 100 MiB available."""
    monkeypatch.setattr(runtime.device, 'available_memory', lambda: 100 * 2**20)


def test_train_refuses_sizes_beyond_the_memory_before_anything_is_written(
    tmp_path, two_images, little_memory
):
    message = exit_message(tmp_path, two_images, '--max-epoch', '1')
    assert re.fullmatch(
        r'train\.py: --batch-size 1 of 32x24 \(load size 40x28\) with --ngf 4 --ndf 4 '
        r'--n-blocks 1 and 1 instance slot needs about 0\.\d GiB of memory \(estimated from the '
        r'sizes\), and this machine has 0\.1 GiB available; make some of these smaller',
        message,
    ), message
    assert not (tmp_path / 'models').exists() and not (tmp_path / 'monitor').exists()


@pytest.mark.parametrize(
    'flags, needed',
    [(['--ngf', '100000'], 1793745.3), (['--loadSizeH', '100000', '--loadSizeW', '100000'], 670.7)],
)
def test_huge_sizes_are_refused_in_one_line(tmp_path, two_images, flags, needed):
    line = one_line(train_cli(two_images, tmp_path / 'm', tmp_path / 'o', '--max-epoch', '1', *flags))
    assert f'needs about {needed} GiB of memory (estimated from the sizes)' in line, line
    assert not (tmp_path / 'm').exists() and not (tmp_path / 'o').exists()


def test_a_batch_larger_than_a_domain_repeats_its_images_and_says_so(tmp_path, two_images, caplog):
    run_in(tmp_path, two_images, '--max-epoch', '1', '--batch-size', '3')
    for letter in 'AB':
        assert (
            f'--batch-size 3 is larger than the 2 images of {two_images}/train{letter}: each '
            'of its batches repeats images' in caplog.messages
        )
    assert os.listdir(tmp_path / 'models') == ['checkpoint_000000001']


def test_translate_and_evaluate_refuse_sizes_beyond_the_memory(tmp_path, little_memory, restore_context):
    model = save_generators(tmp_path / 'model')
    data = tmp_path / 'data'
    left_and_right(data, 'train', 6)
    left_and_right(data, 'test', 3)
    for program, argv, generators in [
        (
            translate,
            ['--params', str(model), '--dataroot', str(data), '--fineSizeH', '800', '--fineSizeW', '600'],
            '1 generator',
        ),
        (evaluate, ['--model-save-path', str(model.parent), '--dataroot', str(data)], '2 generators'),
    ]:
        with pytest.raises(SystemExit) as error:
            program.main(argv + ['--out', str(tmp_path / 'out')])
        message = str(error.value)
        size = '800x600' if program is translate else '32x24'
        assert re.fullmatch(
            rf'{program.__name__}\.py: {generators} of --ngf 4 --n-blocks 1 at {size} needs '
            r'about \d+\.\d GiB of memory \(estimated from the sizes\), and this machine has '
            r'0\.1 GiB available',
            message,
        ), message
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize(
    'what, flags, refused',
    [
        (
            'translate',
            ['--fineSizeH', '8000', '--fineSizeW', '8000', '--loadSizeH', '8000', '--loadSizeW', '8000'],
            '1 generator of --ngf 16 --n-blocks 9 at 8000x8000',
        ),
        (
            'data',
            ['--loadSizeH', '100000', '--loadSizeW', '100000'],
            '--batch-size 1 of load size 100000x100000',
        ),
    ],
)
def test_bench_refuses_sizes_beyond_the_memory(what, flags, refused):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'bench.py'), '--what', what] + flags,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    line = one_line(result, 'bench.py')
    assert line.startswith(f'bench.py: {refused} needs about '), line


# 13. Unclear messages ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    'stray', ['trainA_seg/._NAME_0.png', 'trainA/._NAME.png', 'trainB/folder.png/', 'trainB_seg/NAME_1.png/']
)
def test_hidden_files_and_folders_named_like_images_are_no_images(tmp_path, two_images, stray):
    """macOS leaves AppleDouble files (._NAME) beside every file copied to some disks."""
    data = tmp_path / 'data'
    shutil.copytree(two_images, data)
    letter = stray[len('train')]
    name = sorted((data / f'train{letter}').iterdir())[0].stem
    path = data / stray.replace('NAME', name).rstrip('/')
    if stray.endswith('/'):
        path.mkdir()
    else:
        path.write_bytes(b'\x00\x05\x16\x07 AppleDouble')
    run_in(tmp_path, data, '--max-epoch', '1')
    assert os.listdir(tmp_path / 'models') == ['checkpoint_000000002']


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory, two_images):
    """A run's models folder after one epoch on two images."""
    folder = tmp_path_factory.mktemp('trained_run')
    run_in(folder, two_images, '--max-epoch', '1')
    return folder / 'models'


def model_forms(run):
    checkpoint = run / 'checkpoint_000000002'
    return {
        'a run folder': run,
        'a checkpoint folder': checkpoint,
        'a pretrained folder': os.path.join(ROOT, 'pretrained', 'jeans2skirt_64x44'),
        'a parameters.h5': checkpoint / 'parameters.h5',
    }


@pytest.mark.parametrize(
    'form', ['a run folder', 'a checkpoint folder', 'a pretrained folder', 'a parameters.h5']
)
def test_translate_and_evaluate_take_a_model_in_every_form(tmp_path, trained_run, form, restore_context):
    model = str(model_forms(trained_run)[form])
    data = tmp_path / 'data'
    left_and_right(data, 'train', 6)
    left_and_right(data, 'test', 3)
    flag = '--params' if model.endswith('.h5') else '--model-save-path'
    translate.main([flag, model, '--dataroot', str(data), '--out', str(tmp_path / 'translated')])
    assert len(list((tmp_path / 'translated').glob('*_tile.png'))) == 3  # testA: the default
    evaluate.main(
        ['--model-save-path', model, '--dataroot', str(data), '--json', '--out', str(tmp_path / 'evaluated')]
    )
    assert len(list((tmp_path / 'evaluated').glob('*.png'))) == 6


def test_translate_reads_the_test_phase_by_default(tmp_path, trained_run, restore_context):
    data = tmp_path / 'data'
    left_and_right(data, 'train', 2)
    with pytest.raises(SystemExit) as error:
        translate.main(
            ['--model-save-path', str(trained_run), '--dataroot', str(data), '--out', str(tmp_path / 'out')]
        )
    assert str(error.value) == f'translate.py: {data}/testA: folder not found'


@pytest.mark.parametrize(
    'flags, error',
    [
        (['--device-id', 'xyz'], "argument --device-id/-d: 'xyz' is not a device number"),
        (['--out', ''], "argument --out: '' is not a path"),
    ],
)
def test_evaluate_refuses_bad_flag_values(trained_run, flags, error):
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'evaluate.py'),
            '--model-save-path',
            str(trained_run),
            '--dataroot',
            os.path.join(ROOT, 'datasets', 'ccp_sample'),
        ]
        + flags,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f'evaluate.py: error: {error}'


@pytest.mark.skipif(cuda_installed(), reason='nnabla-ext-cuda is installed here')
def test_cudnn_without_cuda_is_the_same_line_in_every_program(tmp_path, trained_run):
    runs = {
        'train.py': [TRAIN] + TINY + ['-m', str(tmp_path / 'm'), '-o', str(tmp_path / 'o')],
        'translate.py': [
            os.path.join(ROOT, 'translate.py'),
            '--model-save-path',
            str(trained_run),
            '--dataroot',
            two_domains(tmp_path),
            '--out',
            str(tmp_path / 'out'),
        ],
        'evaluate.py': [
            os.path.join(ROOT, 'evaluate.py'),
            '--model-save-path',
            str(trained_run),
            '--dataroot',
            two_domains(tmp_path),
            '--out',
            str(tmp_path / 'out'),
        ],
    }
    for program, argv in runs.items():
        result = subprocess.run(
            [sys.executable] + argv + ['-c', 'cudnn'], capture_output=True, text=True, timeout=300
        )
        assert one_line(result, program) == (
            f'{program}: --context cudnn needs nnabla-ext-cuda, which is not installed (pip '
            'install -r requirements-cuda.txt)'
        )


def two_domains(tmp_path):
    data = tmp_path / 'data'
    if not data.exists():
        left_and_right(data, 'train', 2)
        left_and_right(data, 'test', 2)
    return str(data)


# 14. A log file, not a terminal -------------------------------------------------------------------


def test_a_log_file_gets_plain_lines_and_a_few_of_them(tmp_path, two_images):
    log = tmp_path / 'train.log'
    started = time.monotonic()
    with open(log, 'w') as stderr:
        result = subprocess.run(
            [sys.executable, TRAIN]
            + TINY
            + [
                '--dataroot',
                str(two_images),
                '--max-epoch',
                '3',
                '--monitor-path',
                str(tmp_path / 'm'),
                '--model-save-path',
                str(tmp_path / 'o'),
            ],
            stderr=stderr,
            timeout=600,
        )
    minutes = (time.monotonic() - started) / 60
    assert result.returncode == 0
    text = log.read_text()
    assert '\r' not in text and '\x1b' not in text
    progress = [line for line in text.splitlines() if re.search(r'epoch \d/3: \d/2', line)]
    ends = [re.search(r'epoch (\d)/3: 2/2', line) for line in progress]
    assert [end.group(1) for end in ends if end] == ['1', '2', '3']
    assert len(progress) <= 3 + minutes  # besides the epochs' ends, one a minute at most
