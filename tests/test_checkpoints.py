"""Checkpoints hold data, never code; --resume takes the newest intact one and refuses settings
that cannot change. Runs use two images per domain: an epoch is two iterations."""

import json
import math
import os
import pickle
import shutil

import h5py
import numpy as np
import pytest
from test_train import TINY

import args
import data
import train
from args import get_args

MARKER = 'unpickled'  # made in the working directory by Malicious if it is ever unpickled


class Malicious:
    def __reduce__(self):
        return os.mkdir, (MARKER,)


def run_in(folder, dataroot, *flags):
    train.main(
        TINY
        + [
            '--dataroot',
            str(dataroot),
            '--monitor-path',
            str(folder / 'monitor'),
            '--model-save-path',
            str(folder / 'models'),
        ]
        + list(flags)
    )


@pytest.fixture
def run(tmp_path, two_epochs, two_images, monkeypatch):
    """A copy of the two-epoch run, and a function that runs train.py on it."""
    shutil.copytree(two_epochs, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)  # where Malicious would leave its marker

    def run_copy(*flags):
        run_in(tmp_path, two_images, *flags)

    run_copy.models = tmp_path / 'models'
    return run_copy


def checkpoint(run, iteration):
    return run.models / f'checkpoint_{iteration:09d}'


def exit_message(run, *flags):
    with pytest.raises(SystemExit) as error:
        run(*flags)
    return str(error.value)


def test_a_checkpoint_is_arrays_and_json(two_epochs):
    path = two_epochs / 'models' / 'checkpoint_000000004'
    assert sorted(os.listdir(path)) == [
        'parameters.h5',
        'solver_states.npz',
        'state.json',
        'training_state.npz',
    ]
    pool = 'state.training_state.pools.x.images'
    for arrays in ['training_state.npz', 'solver_states.npz']:
        with np.load(path / arrays, allow_pickle=False) as archive:
            assert all(archive[key].dtype != object for key in archive.files)
    with np.load(path / 'training_state.npz', allow_pickle=False) as archive:
        assert archive[pool].shape == (4, 3, 32, 24)  # one fake per iteration
    state = json.loads((path / 'state.json').read_text())
    assert (state['iteration'], state['epoch']) == (4, 2)
    assert {d: record['images'] for d, record in state['dataset']['domains'].items()} == {'x': 2, 'y': 2}
    assert state['training_state']['pools']['x']['images'] == {'array': pool}


def test_resume_ignores_a_planted_pickle(run):
    with open(checkpoint(run, 4) / 'trainer.pkl', 'wb') as f:
        pickle.dump(Malicious(), f)
    run('--max-epoch', '3', '--resume')
    assert not os.path.exists(MARKER)
    assert os.path.exists(checkpoint(run, 6))


def test_resume_refuses_object_arrays_and_old_pickled_state(run, caplog):
    """The newest checkpoint is as an older version wrote it, with trainer.pkl; the other
    holds an object array, which only unpickling could load."""
    os.remove(checkpoint(run, 4) / 'training_state.npz')
    with open(checkpoint(run, 4) / 'trainer.pkl', 'wb') as f:
        pickle.dump({'trainer': Malicious()}, f)
    archive = checkpoint(run, 2) / 'training_state.npz'
    with np.load(archive) as saved:
        arrays = dict(saved)
    arrays['state.training_state.pools.x.images'] = np.array([Malicious()], dtype=object)
    np.savez(archive, **arrays)
    assert exit_message(run, '--max-epoch', '3', '--resume') == (
        f'train.py: --resume: no intact checkpoint in {run.models} (skipped 2, see the warnings above)'
    )
    assert not os.path.exists(MARKER)
    assert (
        f'--resume: skipped checkpoint_000000004: {checkpoint(run, 4)}/training_state.npz '
        'is missing (an older version wrote trainer.pkl, which is never unpickled: '
        'unpickling can run code)' in caplog.messages
    )
    assert (
        f'--resume: skipped checkpoint_000000002: {archive} is unreadable (ValueError: '
        'Object arrays cannot be loaded when allow_pickle=False)' in caplog.messages
    )


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    'damage, file, reason',
    [
        (
            truncate,
            'parameters.h5',
            'is unreadable (OSError: Unable to synchronously open file (truncated file',
        ),
        (os.remove, 'solver_states.npz', 'is missing'),
        (truncate, 'solver_states.npz', 'is unreadable'),
        (truncate, 'training_state.npz', 'is unreadable'),
        (os.remove, 'state.json', 'is missing'),
        (
            lambda path: path.write_text('{"iteration": 4, "epo'),
            'state.json',
            'is unreadable (JSONDecodeError',
        ),
    ],
)
def test_resume_falls_back_past_a_damaged_checkpoint(run, caplog, damage, file, reason):
    damage(checkpoint(run, 4) / file)
    run('--max-epoch', '2', '--resume')
    skipped = [m for m in caplog.messages if m.startswith('--resume: skipped')]
    assert len(skipped) == 1
    assert skipped[0].startswith(
        f'--resume: skipped checkpoint_000000004: {checkpoint(run, 4) / file} {reason}'
    )
    assert f'resumed from {checkpoint(run, 2)} at iteration 2' in caplog.messages
    # the run was copied: its checkpoints name the old monitor folder (said once, not per try)
    assert len([m for m in caplog.messages if m.startswith('--resume: --monitor-path')]) == 1
    # The damaged folder is out of the way; the run redid iterations 2 and 3.
    assert sorted(os.listdir(run.models)) == [
        'checkpoint_000000002',
        'checkpoint_000000004',
        'checkpoint_000000004.damaged',
    ]
    assert json.loads((checkpoint(run, 4) / 'state.json').read_text())['iteration'] == 4


def test_only_the_exact_checkpoint_names_count(run, caplog):
    for name in ['checkpoint_good', 'checkpoint_000000009.bak', 'checkpoint_000000099']:
        shutil.copytree(checkpoint(run, 2), run.models / name)
    run('--max-epoch', '3', '--resume')
    assert (
        f'--resume: skipped checkpoint_000000099: {run.models}/checkpoint_000000099/'
        'state.json is unreadable (ValueError: it says iteration 2)' in caplog.messages
    )
    assert f'resumed from {checkpoint(run, 4)} at iteration 4' in caplog.messages
    assert sorted(os.listdir(run.models)) == [
        'checkpoint_000000002',
        'checkpoint_000000004',
        'checkpoint_000000006',
        'checkpoint_000000009.bak',
        'checkpoint_000000099.damaged',
        'checkpoint_good',
    ]


def test_a_killed_write_is_removed_at_start(run):
    partial = run.models / '.checkpoint_000000005.partial'  # killed after a signal
    partial.mkdir()
    (partial / 'parameters.h5').write_bytes(b'half')
    run('--max-epoch', '3', '--resume')
    assert not partial.exists() and checkpoint(run, 6).exists()


def test_resume_policy_covers_every_flag_once():
    policy = args.FIXED_ON_RESUME + args.CHANGEABLE_ON_RESUME + args.NOT_COMPARED_ON_RESUME
    assert sorted(policy) == sorted(vars(get_args([])))


@pytest.mark.parametrize(
    'flags, refused',
    [
        (['--batch-size', '2'], '--batch-size 1, not 2'),
        (['--fineSizeH', '28'], '--fineSizeH 32, not 28'),
        (['--ins-per', '1'], '--ins-per 2, not 1'),
        (['--seed', '5'], '--seed 0, not 5'),
        (['--no-flip', '--pool-size', '7'], '--no-flip off, not on; --pool-size 50, not 7'),
        (['--set-order', 'random'], '--set-order decreasing, not random'),
        (['--ndf', '8'], '--ndf 4, not 8'),
    ],
)
def test_resume_refuses_flags_that_decide_data_shapes_or_state(run, flags, refused):
    assert exit_message(run, '--max-epoch', '3', '--resume', *flags) == (
        f'train.py: {checkpoint(run, 4)} was made with {refused} (these flags decide the data, '
        'the shapes or the saved state and cannot change on resume)'
    )
    assert not checkpoint(run, 6).exists()


def test_resume_refuses_another_dataroot_and_a_changed_dataset(run, two_images, tmp_path):
    other = tmp_path / 'other'
    shutil.copytree(two_images, other)
    assert exit_message(run, '--max-epoch', '3', '--resume', '--dataroot', str(other)) == (
        f'train.py: {checkpoint(run, 4)}: the dataset changed since: it was trained on '
        f'{two_images}, not {other}; resume with the data it was trained on, or start afresh'
    )
    image = sorted((two_images / 'trainA').iterdir())[0]
    added = two_images / 'trainA' / ('added' + image.suffix)
    shutil.copy(image, added)
    shutil.copy(
        two_images / 'trainA_seg' / (image.stem + '_0.png'), two_images / 'trainA_seg' / 'added_0.png'
    )
    try:
        message = exit_message(run, '--max-epoch', '3', '--resume')
    finally:
        added.unlink()
        (two_images / 'trainA_seg' / 'added_0.png').unlink()
    assert message == (
        f'train.py: {checkpoint(run, 4)}: the dataset changed since: '
        f'{two_images / "trainA"} held 2 images and now holds 3; resume with the '
        'data it was trained on, or start afresh'
    )


def test_resume_with_changed_weights_and_rates_says_so_and_uses_them(run, caplog):
    run(
        '--max-epoch',
        '3',
        '--resume',
        '--lambda-cyc',
        '5',
        '--learning-rate-G',
        '1e-4',
        '--keep-checkpoints',
        '1',
    )
    for line in [
        '--max-epoch 3 (the checkpoint has 2)',
        '--lambda-cyc 5.0 (the checkpoint has 10.0)',
        '--learning-rate-G 0.0001 (the checkpoint has 0.0002)',
        '--keep-checkpoints 1 (the checkpoint has 3)',
    ]:
        assert '--resume: ' + line in caplog.messages
    assert os.listdir(run.models) == ['checkpoint_000000006']
    state = json.loads((checkpoint(run, 6) / 'state.json').read_text())
    # The third epoch (index 2) of a decay starting after epoch 1, over 3 epochs: 1/3 left.
    assert state['learning_rates']['generator_x2y'] == pytest.approx(1e-4 / 3)
    assert state['learning_rates']['discriminator_x'] == pytest.approx(2e-4 / 3)


@pytest.mark.parametrize('max_epoch', ['1', '2'])
def test_resume_of_a_finished_run_says_there_is_nothing_to_train(run, max_epoch):
    assert exit_message(run, '--max-epoch', max_epoch, '--resume') == (
        f'train.py: --resume: the checkpoint is at iteration 4 (epoch 2), where --max-epoch '
        f'{max_epoch} has ended: nothing to train; give a larger --max-epoch'
    )


def edit_state(path, edit):
    state = json.loads((path / 'state.json').read_text())
    edit(state)
    (path / 'state.json').write_text(json.dumps(state))


def edit_arrays(path, edit):
    with np.load(path / 'training_state.npz') as archive:
        arrays = dict(archive)
    edit(arrays)
    np.savez(path / 'training_state.npz', **arrays)


def without_one_parameter(path):
    with h5py.File(path / 'parameters.h5', 'r+') as f:
        del f['generator_y2x/mask_decoder/out/conv/W']


def loaders_x(state):
    return state['training_state']['loaders']['x']


def series(state):
    return state['training_state']['monitors']['series']['generator_loss_x']


# Hand-edited or damaged checkpoints, and the words their warning holds.
EDITS = {
    'a parameter missing': (
        without_one_parameter,
        'parameters.h5 is unreadable (ValueError: lacks generator_y2x/mask_decoder/out/conv/W)',
    ),
    'iteration 6.0': (
        lambda path: edit_state(path, lambda s: s.update(iteration=6.0)),
        'state.json is unreadable (ValueError: it says iteration 6.0)',
    ),
    'loader cursor 10**18': (
        lambda path: edit_state(path, lambda s: loaders_x(s).update(cursor=10**18)),
        'cursor 1000000000000000000',
    ),
    'loader cursor "2"': (
        lambda path: edit_state(path, lambda s: loaders_x(s).update(cursor='2')),
        "cursor '2'",
    ),
    'loader rng "abc"': (
        lambda path: edit_state(path, lambda s: loaders_x(s).update(rng='abc')),
        'do not hold a training state',
    ),
    'pending value "abc"': (
        lambda path: edit_state(path, lambda s: series(s).update(pending=['abc'])),
        "'pending': ['abc']",
    ),
    'timer total Infinity': (
        lambda path: edit_state(
            path, lambda s: s['training_state']['monitors']['timer'].update(total=math.inf)
        ),
        "'total': inf",
    ),
    'pool as a list': (
        lambda path: edit_state(path, lambda s: s['training_state']['pools']['x'].update(images=[[0.5]])),
        'a pool of (1, 1) images',
    ),
    'pool of strings': (
        lambda path: edit_arrays(
            path,
            lambda a: a.update(
                {'state.training_state.pools.x.images': a['state.training_state.pools.x.images'].astype(str)}
            ),
        ),
        'images of <U',
    ),
    'dataset domains as a list': (
        lambda path: edit_state(path, lambda s: s['dataset'].update(domains=[])),
        'unreadable dataset record',
    ),
    'run as a number': (
        lambda path: edit_state(path, lambda s: s.update(run=7)),
        'state.json is unreadable (run is 7',
    ),
}


@pytest.mark.parametrize('edit', EDITS)
def test_a_hand_edited_checkpoint_is_skipped_as_damaged(run, caplog, edit):
    change, words = EDITS[edit]
    change(checkpoint(run, 4))
    run('--max-epoch', '3', '--resume')
    [skipped] = [m for m in caplog.messages if m.startswith('--resume: skipped')]
    assert skipped.startswith(f'--resume: skipped checkpoint_000000004: {checkpoint(run, 4)}')
    assert words in skipped, skipped
    assert f'resumed from {checkpoint(run, 2)} at iteration 2' in caplog.messages
    assert sorted(os.listdir(run.models)) == [
        'checkpoint_000000002',
        'checkpoint_000000004',
        'checkpoint_000000004.damaged',
        'checkpoint_000000006',
    ]


def test_a_nan_loss_under_nan_policy_warn_is_checkpointed_and_resumed(
    tmp_path, two_images, monkeypatch, caplog
):
    """A NaN in the loss values waiting for their series line (JSON has no NaN) must not stop
    the checkpoint; the series shows it."""
    real_next = data.MaskedImageIterator.next
    calls = []

    def next_with_nan(self):
        images, masks = real_next(self)
        calls.append(None)
        if len(calls) > 2:  # from iteration 1 on
            images[:] = np.nan
        return images, masks

    monkeypatch.setattr(data.MaskedImageIterator, 'next', next_with_nan)
    run_in(tmp_path, two_images, '--max-epoch', '1', '--nan-policy', 'warn')
    assert 'generator_loss_x is nan at iteration 1' in caplog.messages
    monkeypatch.undo()
    run_in(tmp_path, two_images, '--max-epoch', '2', '--nan-policy', 'warn', '--resume')
    series = np.loadtxt(tmp_path / 'monitor' / 'generator_loss_x.series.txt', ndmin=2)
    assert list(series[:, 0]) == [3] and np.isnan(series[0, 1])


@pytest.mark.parametrize(
    'change, changes',
    [
        ('rename', 'the names of the files in {A} or {A}_seg changed'),
        (
            'add a mask',
            'the names of the files in {A} or {A}_seg changed; its images had at most 1 '
            'instance masks and now have 2',
        ),
    ],
)
def test_resume_names_a_dataset_changed_in_place(run, two_images, change, changes):
    """The image count stays; a file name, or the instance slots, do not."""
    image = sorted((two_images / 'trainA').iterdir())[0]
    mask = two_images / 'trainA_seg' / f'{image.stem}_0.png'
    if change == 'rename':
        moves = [(image, image.with_name('renamed.png')), (mask, mask.with_name('renamed_0.png'))]
    else:
        moves = [(None, mask.with_name(f'{image.stem}_1.png'))]
    for old, new in moves:
        shutil.copy(old or mask, new)
        if old:
            old.unlink()
    try:
        message = exit_message(run, '--max-epoch', '3', '--resume')
    finally:
        for old, new in moves:
            if old:
                shutil.copy(new, old)
            new.unlink()
    assert message == (
        f'train.py: {checkpoint(run, 4)}: the dataset changed since: '
        f'{changes.format(A=two_images / "trainA")}; resume with the data it was trained on, or '
        'start afresh'
    )
    assert not checkpoint(run, 6).exists()
