"""Checkpoints, and how a run resumes from them.

A checkpoint is a folder MODEL_PATH/checkpoint_ITERATION, the iteration in 9 digits; a folder
of any other name (checkpoint_good, checkpoint_000000016.bak) is not one. It holds

    parameters.h5            every parameter (nnabla's format)
    solver_states.npz        each solver's step count and moments
    training_state.npz       the arrays of the state
    state.json               everything else, written last

Every file is serialised in memory and written through runtime.files, into
.checkpoint_ITERATION.partial, which is renamed when complete: a full disk or a kill at any
moment leaves the older checkpoints intact and no half-written one. Nothing is pickled: a
shared checkpoint is data, never code, and arrays load with allow_pickle=False. Checkpoints of
earlier versions (a SOLVER.h5 per solver, older parameter names) still load.
"""

import io
import json
import os
import re
import shutil

import h5py
import nnabla as nn
import numpy as np
from nnabla.logger import logger

from runtime import RunError
from runtime.files import WriteFailed, write_bytes, write_failed

CHECKPOINT = re.compile(r'checkpoint_(\d{9})')
PARAMETERS = 'parameters.h5'
SOLVER_STATES = 'solver_states.npz'
ARRAYS = 'training_state.npz'


class DamagedCheckpoint(RunError):
    """A checkpoint file is missing or unreadable; the message names it."""


def checkpoint_folders(model_path):
    """The checkpoint folders in model_path, oldest first, complete or not."""
    names = sorted(
        n
        for n in os.listdir(model_path)
        if CHECKPOINT.fullmatch(n) and os.path.isdir(os.path.join(model_path, n))
    )
    return [os.path.join(model_path, n) for n in names]


def checkpoint_paths(model_path):
    """The complete checkpoints in model_path (with their state.json), oldest first."""
    return [
        path for path in checkpoint_folders(model_path) if os.path.exists(os.path.join(path, 'state.json'))
    ]


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


def npz_bytes(arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def parameters_bytes():
    buffer = io.BytesIO()
    nn.save_parameters(buffer, extension='.h5')
    return buffer.getvalue()


def solver_state_arrays(solvers):
    """{SOLVER/PARAMETER/STATE: array, SOLVER/PARAMETER/t: step count} of every solver."""
    arrays = {}
    for solver_name, solver in solvers.items():
        for name, state in solver.get_states().items():
            arrays[f'{solver_name}/{name}/t'] = np.array(state.t, np.int64)
            for key, variable in state.pstate.items():
                arrays[f'{solver_name}/{name}/{key}'] = variable.d.copy()
    return arrays


def save_checkpoint(model_path, iteration, state, solvers, keep):
    """Write model_path/checkpoint_ITERATION: the parameters, the solvers' states, and `state`
    (JSON-able but for numpy arrays anywhere in it); then keep only the newest `keep`
    checkpoints. Returns its path."""
    name = f'checkpoint_{iteration:09d}'
    final = os.path.join(model_path, name)
    partial = os.path.join(model_path, f'.{name}.partial')
    arrays = {}
    state = split_arrays(dict(state, iteration=iteration), arrays)
    files = {
        PARAMETERS: parameters_bytes(),
        SOLVER_STATES: npz_bytes(solver_state_arrays(solvers)),
        ARRAYS: npz_bytes(arrays),
        'state.json': json.dumps(state, indent=1, allow_nan=False).encode(),
    }
    try:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        for file_name, data in files.items():
            write_bytes(os.path.join(partial, file_name), data)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(partial, final)
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, OSError):
            raise write_failed(partial, error) from None
        raise
    for old in checkpoint_folders(model_path)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def damaged(path, name, error):
    """DamagedCheckpoint naming the file `name` of the checkpoint `path`."""
    if isinstance(error, FileNotFoundError):
        reason = 'missing'
        if name == ARRAYS and os.path.exists(os.path.join(path, 'trainer.pkl')):
            reason += (
                ' (an older version wrote trainer.pkl, which is never unpickled: unpickling can run code)'
            )
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
        if not isinstance(state, dict):
            raise ValueError('not a JSON object')
        missing = [key for key in ('iteration',) + tuple(keys) if key not in state]
        if missing:
            raise ValueError(f'no {", ".join(missing)}')
        iteration = int(CHECKPOINT.fullmatch(os.path.basename(path)).group(1))
        if type(state['iteration']) is not int or state['iteration'] != iteration:
            raise ValueError(f'it says iteration {state["iteration"]!r}')
    except Exception as error:
        raise damaged(path, 'state.json', error) from None
    try:
        with np.load(os.path.join(path, ARRAYS), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        return join_arrays(state, arrays)
    except Exception as error:
        raise damaged(path, ARRAYS, error) from None


def read_parameters(path, rename=None):
    """{name: array} of a parameter file, each name passed through `rename` (an earlier
    version's name -> today's). Raises OSError or ValueError if it is not one."""
    arrays = {}
    with h5py.File(path, 'r') as f:

        def visit(name, item):
            if isinstance(item, h5py.Dataset):
                arrays[rename(name) if rename else name] = item[()]

        f.visititems(visit)
    if not arrays:
        raise ValueError('holds no parameters')
    return arrays


def load_parameters(path, rename=None):
    """Set the current parameters from a parameter file; returns the names it held."""
    arrays = read_parameters(path, rename)
    current = nn.get_parameters(grad_only=False)
    for name, array in arrays.items():
        if name in current:
            if current[name].shape != array.shape:
                raise ValueError(f'{name} is {array.shape}, the networks need {current[name].shape}')
            current[name].d = array
    return set(arrays)


def load_solver_states(path, solvers, rename=None):
    """Each solver's states from solver_states.npz, or from an earlier version's SOLVER.h5."""
    npz = os.path.join(path, SOLVER_STATES)
    if not os.path.exists(npz) and any(os.path.exists(os.path.join(path, f'{name}.h5')) for name in solvers):
        return load_old_solver_states(path, solvers, rename)
    with np.load(npz, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    for solver_name, solver in solvers.items():
        states = solver.get_states()
        for name, state in states.items():
            prefix = f'{solver_name}/{name}/'
            state.t = int(arrays[prefix + 't'])
            for key, variable in state.pstate.items():
                saved = arrays[prefix + key]
                if saved.shape != variable.shape:
                    raise ValueError(f'{prefix}{key} is {saved.shape}, not {variable.shape}')
                variable.d = saved
        solver.set_states(states)


def load_old_solver_states(path, solvers, rename):
    """SOLVER.h5 of earlier versions, whose states may be keyed by older parameter names: read
    into a solver over the same variables under those names, then handed over."""
    for solver_name, solver in solvers.items():
        file = os.path.join(path, f'{solver_name}.h5')
        if not os.path.exists(file):
            raise FileNotFoundError(file)
        stored = set()
        with h5py.File(file, 'r') as f:
            f.visit(stored.add)
        params = solver.get_parameters()
        old_names = {
            new: old
            for old, new in ((name, rename(name) if rename else name) for name in stored)
            if new in params
        }
        reader = type(solver)()
        reader.set_parameters({old_names.get(name, name): v for name, v in params.items()})
        reader.load_states(file)
        by_old = {old: new for new, old in old_names.items()}
        solver.set_states({by_old.get(name, name): state for name, state in reader.get_states().items()})


def load_parameters_and_solvers(path, solvers, rename=None):
    """Load the checkpoint's parameters into the current parameters and its solver states
    into `solvers`; raises DamagedCheckpoint naming a missing, unreadable or incomplete file."""
    file = os.path.join(path, PARAMETERS)
    try:
        held = load_parameters(file, rename)
        missing = sorted(set(nn.get_parameters(grad_only=False)) - held)
        if missing:
            raise ValueError(
                f'lacks {missing[0]}' + (f' and {len(missing) - 1} more' if len(missing) > 1 else '')
            )
    except Exception as error:
        raise damaged(path, PARAMETERS, error) from None
    try:
        load_solver_states(path, solvers, rename)
    except Exception as error:
        name = SOLVER_STATES
        if isinstance(error, FileNotFoundError) and error.filename:
            name = os.path.basename(error.filename)
        raise damaged(path, name, error) from None


def resume_newest(model_path, restore):
    """restore(path) the newest checkpoint that restores; returns its path and what restore
    returned. Newer
    damaged ones are skipped with a line naming the file, then renamed NAME.damaged: the
    iterations after the one resumed are redone, and a damaged folder must not pass for the
    newest checkpoint."""
    folders = checkpoint_folders(model_path)
    if not folders:
        raise RunError(f'--resume: no checkpoint in {model_path}')
    skipped = []
    for path in reversed(folders):
        try:
            restored = restore(path)
        except DamagedCheckpoint as error:
            logger.warning(f'--resume: skipped {os.path.basename(path)}: {error}')
            skipped.append(path)
            continue
        for bad in skipped:
            shutil.rmtree(bad + '.damaged', ignore_errors=True)
            os.rename(bad, bad + '.damaged')
            logger.info(f'--resume: renamed {bad} to {bad}.damaged')
        return path, restored
    raise RunError(
        f'--resume: no intact checkpoint in {model_path} (skipped {len(skipped)}, see the warnings above)'
    )


def shown(value):
    """A flag's value as a message shows it: on/off for switches."""
    return ('on' if value else 'off') if isinstance(value, bool) else value


def changed_flags(names, saved_args, args):
    """[(name, value in the checkpoint, value now)] of the flags in `names` that changed."""
    return [
        (name, saved_args[name], getattr(args, name))
        for name in names
        if name in saved_args and saved_args[name] != getattr(args, name)
    ]


def dataset_changes(saved, now):
    """What differs between two Loaders.identity() records, in words; empty if nothing."""
    if saved['path'] != now['path']:
        return [f'it was trained on {saved["path"]}, not {now["path"]}']
    changes = []
    for domain, then in saved['domains'].items():
        current = now['domains'][domain]
        folder = os.path.join(now['path'], current['folder'])
        if then['images'] != current['images']:
            changes.append(f'{folder} held {then["images"]} images and now holds {current["images"]}')
        elif then['fingerprint'] != current['fingerprint']:
            changes.append(f'the names of the files in {folder} or {folder}_seg changed')
    if saved['ins_max'] != now['ins_max']:
        changes.append(
            f'its images had at most {saved["ins_max"]} instance masks and now have {now["ins_max"]}'
        )
    return changes


def resume(args, solvers, training_state, dataset, fixed, changeable, rename=None, check=None):
    """Restore the newest intact checkpoint of args.model_save_path into the current parameters,
    `solvers` and `training_state`; returns its state.json. A flag of `fixed` given another
    value, or a dataset (Loaders.identity()) that changed, refuses the run with one line; so
    does check(path, state), called before anything is restored. Each changed flag of
    `changeable` gets a line."""

    def restore(path):
        saved = read_checkpoint(
            path, keys=['args', 'dataset', 'training_state', 'epoch', 'epoch_samples', 'processes']
        )
        if not isinstance(saved['args'], dict) or not isinstance(saved['dataset'], dict):
            raise DamagedCheckpoint(f'{path}/state.json is unreadable (args or dataset is not an object)')
        for key, least in [('epoch', 0), ('epoch_samples', 0), ('processes', 1)]:
            if type(saved[key]) is not int or saved[key] < least:
                raise DamagedCheckpoint(f'{path}/state.json is unreadable ({key} is {saved[key]!r})')
        refused = changed_flags(fixed, saved['args'], args)
        if refused:
            listed = '; '.join(
                f'--{name.replace("_", "-")} {shown(old)}, not {shown(new)}' for name, old, new in refused
            )
            raise RunError(
                f'{path} was made with {listed} (these flags decide the data, the '
                'shapes or the saved state and cannot change on resume)'
            )
        try:
            changes = dataset_changes(saved['dataset'], dataset)
        except (KeyError, TypeError, AttributeError) as error:
            raise DamagedCheckpoint(
                f'{path}/state.json: unreadable dataset record ({type(error).__name__}: {error})'
            ) from None
        if changes:
            raise RunError(
                f'{path}: the dataset changed since: {"; ".join(changes)}; resume '
                'with the data it was trained on, or start afresh'
            )
        if check:
            check(path, saved)
        load_parameters_and_solvers(path, solvers, rename)
        try:
            training_state.load_state_dict(saved['training_state'])
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise DamagedCheckpoint(
                f'{path}/state.json and {ARRAYS} do not hold a training '
                f'state of this run ({type(error).__name__}: {error})'
            ) from None
        return saved

    path, saved = resume_newest(args.model_save_path, restore)
    logger.info(f'resumed from {path} at iteration {saved["iteration"]}')
    for name, old, new in changed_flags(changeable, saved['args'], args):
        logger.info(f'--resume: --{name.replace("_", "-")} {shown(new)} (the checkpoint has {shown(old)})')
    return saved


class Checkpoints:
    """The checkpoints of one training run: what they hold (parameters, `solvers`, and the
    state_dict of each of `parts`, so that a resumed run goes on exactly as an uninterrupted
    one; `dataset` is the data.Loaders, identified in each), writing them (rank 0 of
    `processes` alone) and resuming from them (every rank)."""

    def __init__(self, args, solvers, dataset, run, processes, **parts):
        self.args, self.solvers, self.loaders = args, solvers, dataset
        self.run, self.processes, self.parts = run, processes, parts

    def state_dict(self):
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state):
        for name, part in self.parts.items():  # in order: the monitors last, they rewrite files
            part.load_state_dict(state[name])

    def save(self, iteration, epoch, position):
        """Write the checkpoint of `iteration`, `position` iterations of global batches into
        `epoch`; returns its path (on rank 0, once every rank has finished the step)."""
        if self.processes.rank:
            return None
        args = self.args
        global_batch = args.batch_size * self.processes.size
        saved = {
            'epoch': epoch,
            'epoch_samples': position * global_batch,
            'run': self.run.id,
            'args': vars(args),
            'dataset': self.loaders.identity(),
            'processes': self.processes.size,
            'learning_rates': {k: s.learning_rate() for k, s in self.solvers.items()},
            'training_state': self.state_dict(),
        }
        try:
            return save_checkpoint(
                args.model_save_path, iteration, saved, self.solvers, args.keep_checkpoints
            )
        except WriteFailed as error:
            raise RunError(
                f'could not write the checkpoint of iteration {iteration} in '
                f'{args.model_save_path} ({error.reason}); the earlier ones are '
                'intact'
            ) from None

    def start(self, fixed, changeable, rename):
        """Where training starts: (0, 0, 0), or with --resume where the newest intact checkpoint
        left it; then every rank holds rank 0's parameters and solver states."""
        place = self.resume(fixed, changeable, rename) if self.args.resume else (0, 0, 0)
        self.processes.broadcast_parameters(nn.get_parameters(grad_only=False), self.solvers)
        return place

    def resume(self, fixed, changeable, rename):
        """Rank 0 restores the newest intact checkpoint; the others take its place in training
        and, from the same checkpoint, the loaders' position (parameters and solver states
        follow by broadcast; their pools start empty). Returns the iteration, the epoch and the
        samples of that epoch already trained on, which any number of ranks can continue."""
        place = [0, 0, 0]
        if self.processes.rank == 0:
            saved = resume(
                self.args,
                self.solvers,
                self,
                self.loaders.identity(),
                fixed,
                changeable,
                rename,
                check=lambda path, saved: self.run.continue_run(path, saved.get('run')),
            )
            place = [saved['iteration'], saved['epoch'], saved['epoch_samples']]
            if saved['processes'] != self.processes.size:
                logger.info(
                    f'--resume: {self.processes.size} processes continue a checkpoint '
                    f'of {saved["processes"]}: the data order goes on, the pools of '
                    'ranks other than 0 start empty'
                )
        iteration, epoch, samples = (int(value) for value in self.processes.sum(place))
        if epoch >= self.args.max_epoch:
            raise RunError(
                f'--resume: the checkpoint is at iteration {iteration} (epoch '
                f'{epoch}), where --max-epoch {self.args.max_epoch} has ended: '
                'nothing to train; give a larger --max-epoch'
            )
        if self.processes.rank:
            path = os.path.join(self.args.model_save_path, f'checkpoint_{iteration:09d}')
            self.loaders.load_state_dict(
                read_checkpoint(path, ['training_state'])['training_state']['loaders']
            )
        return iteration, epoch, samples
