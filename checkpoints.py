"""Checkpoints of train.py, and the lock on the folders a run writes.

A checkpoint is a folder MODEL_PATH/checkpoint_ITERATION, the iteration in 9 digits; a folder
of any other name (checkpoint_good, checkpoint_000000016.bak) is not one. It holds

    parameters.h5            nn.save_parameters
    SOLVER.h5                each solver's save_states
    training_state.npz       the arrays of the state (np.savez)
    state.json               everything else, written last

It is written as .checkpoint_ITERATION.partial and renamed when complete. Nothing in it is
pickled: a shared checkpoint is data, never code, and arrays load with allow_pickle=False.
"""
import json
import os
import re
import shutil
import socket
import time

import numpy as np
import nnabla as nn
from nnabla.logger import logger

CHECKPOINT = re.compile(r'checkpoint_(\d{9})')
ARRAYS = 'training_state.npz'


class DamagedCheckpoint(Exception):
    """A checkpoint file is missing or unreadable; the message names it."""


class FolderInUse(Exception):
    """Another run holds the folder's lock; the message names the folder and the process."""


def checkpoint_folders(model_path):
    """The checkpoint folders in model_path, oldest first, complete or not."""
    names = sorted(n for n in os.listdir(model_path)
                   if CHECKPOINT.fullmatch(n) and os.path.isdir(os.path.join(model_path, n)))
    return [os.path.join(model_path, n) for n in names]


def checkpoint_paths(model_path):
    """The complete checkpoints in model_path (with their state.json), oldest first."""
    return [path for path in checkpoint_folders(model_path)
            if os.path.exists(os.path.join(path, 'state.json'))]


def split_arrays(tree, arrays, key='state'):
    """`tree` (dicts, lists, tuples, numbers, strings, numpy arrays) for JSON: each array is
    moved into `arrays` under its path in the tree and replaced by {'array': path}."""
    if isinstance(tree, np.ndarray):
        arrays[key] = tree
        return {'array': key}
    if isinstance(tree, dict):
        return {k: split_arrays(v, arrays, f'{key}.{k}') for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [split_arrays(v, arrays, f'{key}.{i}') for i, v in enumerate(tree)]
    return tree.item() if isinstance(tree, np.generic) else tree


def join_arrays(tree, arrays):
    """The inverse of split_arrays (tuples come back as lists)."""
    if isinstance(tree, dict):
        if tree.keys() == {'array'}:
            return arrays[tree['array']]
        return {k: join_arrays(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_arrays(v, arrays) for v in tree]
    return tree


def save_checkpoint(model_path, iteration, state, solvers, keep):
    """Write model_path/checkpoint_ITERATION: the parameters, the solvers' states, and `state`
    (JSON-able but for numpy arrays anywhere in it); then keep only the newest `keep`
    checkpoints. A kill at any moment leaves the older ones intact."""
    name = f'checkpoint_{iteration:09d}'
    final = os.path.join(model_path, name)
    partial = os.path.join(model_path, f'.{name}.partial')
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        nn.save_parameters(os.path.join(partial, 'parameters.h5'))
        for solver_name, solver in solvers.items():
            solver.save_states(os.path.join(partial, f'{solver_name}.h5'))
        arrays = {}
        state = split_arrays(dict(state, iteration=iteration), arrays)
        np.savez(os.path.join(partial, ARRAYS), **arrays)
        with open(os.path.join(partial, 'state.json'), 'w') as f:
            json.dump(state, f, indent=1)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.rename(partial, final)
    for old in checkpoint_folders(model_path)[:-keep]:
        shutil.rmtree(old)
    return final


def damaged(path, name, error):
    """DamagedCheckpoint naming the file `name` of the checkpoint `path`, missing or unreadable
    by `error`."""
    if isinstance(error, FileNotFoundError):
        reason = 'missing'
        if name == ARRAYS and os.path.exists(os.path.join(path, 'trainer.pkl')):
            reason += (' (an older version wrote trainer.pkl, which is never unpickled: '
                       'unpickling can run code)')
    else:
        reason = f'unreadable ({type(error).__name__}: {error})'
    return DamagedCheckpoint(f'{os.path.join(path, name)} is {reason}')


def read_checkpoint(path, keys):
    """The state saved with the checkpoint `path`, its arrays back in place, read whole so that
    damage shows now. Raises DamagedCheckpoint naming the file if one is missing or
    unreadable, if state.json lacks one of `keys`, or if its iteration is not the folder's."""
    try:
        with open(os.path.join(path, 'state.json')) as f:
            state = json.load(f)
        missing = [key for key in ('iteration',) + tuple(keys) if key not in state]
        if missing:
            raise ValueError(f'no {", ".join(missing)}')
        if state['iteration'] != int(CHECKPOINT.fullmatch(os.path.basename(path)).group(1)):
            raise ValueError(f'it says iteration {state["iteration"]}')
    except Exception as error:
        raise damaged(path, 'state.json', error)
    try:
        with np.load(os.path.join(path, ARRAYS), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        return join_arrays(state, arrays)
    except Exception as error:
        raise damaged(path, ARRAYS, error)


def load_parameters_and_solvers(path, solvers):
    """Load the checkpoint's parameters into the current parameters and its solver states
    into `solvers`; raises DamagedCheckpoint naming a missing or unreadable file."""
    files = {'parameters.h5': nn.load_parameters}
    files.update({f'{name}.h5': solver.load_states for name, solver in solvers.items()})
    for name, load in files.items():
        file = os.path.join(path, name)
        try:
            if not os.path.exists(file):  # nnabla's loaders say otherwise
                raise FileNotFoundError(file)
            load(file)
        except Exception as error:
            raise damaged(path, name, error)


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


class FolderLock:
    """FOLDER/train.lock, so that one run at a time writes into a folder. Created with O_EXCL,
    it holds the owner's pid and host as JSON; the lock of a process that no longer runs (a
    killed run) is taken over with a warning."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, 'train.lock')
        self.owner = {'pid': os.getpid(), 'host': socket.gethostname()}

    def __enter__(self):
        while True:
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.take_over_if_stale()
                continue
            with os.fdopen(descriptor, 'w') as f:
                json.dump(self.owner, f)
            return self

    def __exit__(self, *exc_info):
        self.release()

    def take_over_if_stale(self):
        try:
            with open(self.path) as f:
                holder = json.load(f)
            pid, host = holder['pid'], holder['host']
            if not isinstance(pid, int) or pid < 1:
                raise ValueError(f'pid {pid}')
        except FileNotFoundError:  # released meanwhile
            return
        except (OSError, ValueError, KeyError, TypeError):
            if time.time() - os.path.getmtime(self.path) < 10:  # a new run is writing it
                raise FolderInUse(f'{self.folder} is in use by a train.py run that is starting')
            raise FolderInUse(f'{self.folder} is locked by {self.path}, which names no process; '
                              'delete it if no train.py run uses the folder')
        if host != self.owner['host'] or process_exists(pid):
            where = '' if host == self.owner['host'] else f' on {host}'
            raise FolderInUse(f'{self.folder} is in use by another train.py run (pid {pid}'
                              f'{where}); wait for it to end or choose other folders')
        logger.warning(f'{self.folder}: taking over the lock of pid {pid}, which no longer runs')
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self):
        """Remove the lock if it is still this process's."""
        try:
            with open(self.path) as f:
                if json.load(f) == self.owner:
                    os.remove(self.path)
        except (OSError, ValueError):
            pass
