"""The folders a training run writes, held for the run's whole life.

`Run` is a context manager: on entry it makes the folders (checking that they are writable),
locks each with FOLDER/train.lock, removes what a killed run left half-written, and refuses
folders holding another run's files unless resuming (or deletes them with --overwrite). It
also takes over SIGINT and SIGTERM: while `run.stop.deferring`, the first asks the run to
checkpoint and stop after the current iteration; otherwise the process ends at once, after
releasing the locks. On exit the locks are released, whatever happened.
"""

import json
import os
import re
import shutil
import time
import uuid
from contextlib import ExitStack

from nnabla.logger import logger

from runtime import RunError
from runtime.checkpoints import DamagedCheckpoint
from runtime.files import create_exclusive, make_writable_folder, write_text
from runtime.monitors import write_arguments
from runtime.processes import this_process, why_gone
from runtime.signals import StopRequest, exit_status


class Stopped(RunError):
    """A stop signal (on this rank, or on another: None) ended the run after a checkpoint."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.status = exit_status(signum) if signum else 1


class FolderInUse(RunError):
    """Another run holds the folder's lock; the message names the folder and the process."""


class FolderLock:
    """FOLDER/train.lock, so that one run at a time writes into a folder. Created with O_EXCL,
    it names its process as JSON (runtime.processes.this_process). The lock of a process of
    this host that no longer runs (a killed run, one before a restart, or a pid now reused) is
    taken over with a warning; one of another host is refused, naming the file to delete."""

    def __init__(self, folder):
        self.folder = folder
        self.path = os.path.join(folder, 'train.lock')
        self.owner = this_process()

    def __enter__(self):
        while True:
            try:
                create_exclusive(self.path, json.dumps(self.owner).encode())
            except FileExistsError:
                self.take_over_if_stale()
                continue
            return self

    def __exit__(self, *exc_info):
        self.release()

    def take_over_if_stale(self):
        try:
            with open(self.path) as f:
                holder = json.load(f)
            pid, host = holder['pid'], holder['host']
            if not (
                isinstance(pid, int)
                and pid > 0
                and isinstance(host, str)
                and isinstance(holder.get('boot_id'), (str, type(None)))
                and isinstance(holder.get('start_time'), (int, type(None)))
            ):
                raise ValueError(f'pid {pid}')
        except FileNotFoundError:  # released meanwhile
            return
        except (OSError, ValueError, KeyError, TypeError):
            try:
                age = time.time() - os.path.getmtime(self.path)
            except FileNotFoundError:
                return
            if age < 10:  # a new run is writing it
                raise FolderInUse(f'{self.folder} is in use by a run that is starting') from None
            raise FolderInUse(
                f'{self.folder} is locked by {self.path}, which names no process; '
                'delete it if no run uses the folder'
            ) from None
        if host != self.owner['host']:
            # Its processes cannot be seen from here: only the user can tell.
            raise FolderInUse(
                f'{self.folder} is locked by a run on {host} (pid {pid}); '
                f'if no run on {host} uses the folder, delete {self.path}'
            )
        gone = why_gone(holder)
        if gone is None:
            raise FolderInUse(
                f'{self.folder} is in use by another run (pid {pid}); '
                'wait for it to end or choose other folders'
            )
        logger.warning(f'{self.folder}: taking over the lock of pid {pid}, which no longer runs ({gone})')
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


def run_files(series):
    """The names a training run writes into its folders, temporary ones included, given the
    names of its loss series."""
    names = '|'.join(re.escape(name) for name in series)
    return re.compile(
        r'\.?checkpoint_\d{9}(\.partial|\.damaged)?'
        rf'|({names})\.series(\.partial)?\.txt'
        r'|elapsed_time\.timer(\.partial)?\.txt'
        r'|seconds_per_iteration\.series\.txt'  # written by earlier versions
        r'|(run|Arguments)(\.partial)?\.(json|txt)'
        r'|(losses|translation_(x2y|y2x)_epoch_\d{4,})(\.partial)?\.png'
    )


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


class Run:
    """The run's folders ({flag: path}), locked, and its stop requests. `run_file` matches
    every name a run writes into them, temporary ones included: a fresh run refuses folders
    holding any of it, and --overwrite deletes it (nothing else). A run has an identity `id`,
    kept in identity_folder/run.json and in its checkpoints."""

    def __init__(self, folders, identity_folder, run_file, resume=False, overwrite=False, arguments=None):
        self.identity_file = os.path.join(identity_folder, 'run.json')
        self.arguments = arguments
        # One lock per real folder: -m and -o may name the same one.
        self.folders = list({os.path.realpath(path): (flag, path) for flag, path in folders.items()}.values())
        self.run_file, self.resume, self.overwrite = run_file, resume, overwrite
        self.locks = []
        self.stop = StopRequest('saving a checkpoint after this iteration', before_exit=[self.release])

    @classmethod
    def for_training(cls, args, run_file, rank=0):
        """train.py's run: rank 0 holds -o and -m (with run.json and Arguments.txt in -m);
        the other ranks of a data-parallel run hold no folder, only their stop requests."""
        folders = (
            {'--model-save-path': args.model_save_path, '--monitor-path': args.monitor_path}
            if rank == 0
            else {}
        )
        return cls(folders, args.monitor_path, run_file, args.resume, args.overwrite, args)

    def __enter__(self):
        self.cleanup = ExitStack()
        self.cleanup.enter_context(self.stop)
        try:
            for flag, folder in self.folders:
                make_writable_folder(folder, flag)
                self.locks.append(FolderLock(folder))
                with self.stop.held():  # a stop then finds the lock whole, and releases it
                    self.cleanup.enter_context(self.locks[-1])
            self.claim()
            if self.folders and not self.resume:
                self.identify(uuid.uuid4().hex)
        except BaseException:
            self.cleanup.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self.cleanup.close()

    def release(self):
        for lock in self.locks:
            lock.release()

    def start_training(self):
        """From here the first stop signal asks for a checkpoint after the iteration."""
        self.stop.deferring = True
        self.stop.at_once = '; the checkpoints written so far are kept (continue with --resume)'

    def end_training(self):
        """From here (every checkpoint written) a stop signal ends the program at once."""
        self.stop.deferring = False

    def stopped(self, iteration, saved):
        """End the run after a stop signal (this rank's, or another's: `saved` is None where
        rank 0 wrote the checkpoint)."""
        what = self.stop.name if self.stop.received else 'a stop on another rank'
        where = saved or 'a checkpoint (rank 0 writes it)'
        raise Stopped(
            f'{what} at iteration {iteration}: saved {where}; continue with --resume', self.stop.received
        )

    def identify(self, run):
        """Take the identity `run`: run.json, then Arguments.txt (only now: a resume refused as
        another run's must leave its monitor folder as it was)."""
        self.id = run
        write_text(self.identity_file, json.dumps({'run': run}) + '\n')
        if self.arguments:
            write_arguments(os.path.dirname(self.identity_file), self.arguments)

    def read_identity(self):
        """The run named by the monitor folder's run.json, None where there is none."""
        try:
            with open(self.identity_file) as f:
                run = json.load(f)['run']
            if not isinstance(run, str):
                raise TypeError(f'run is {run!r}')
            return run
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            raise RunError(
                f'{self.identity_file} is unreadable; it names the run that writes '
                'the folder: restore it or start afresh'
            ) from None

    def continue_run(self, checkpoint, run):
        """On resume: the checkpoint's run (None from earlier versions) must be the one whose
        monitor folder this is, so that no run writes into another's series and pictures."""
        if not isinstance(run, (str, type(None))):
            raise DamagedCheckpoint(
                f'{checkpoint}/state.json is unreadable (run is {run!r}, not the id of a run)'
            )
        held = self.read_identity()
        monitor = os.path.dirname(self.identity_file)
        foreign = (
            held != run
            if held
            else run is not None and any(self.run_file.fullmatch(name) for name in os.listdir(monitor))
        )
        if foreign:
            raise RunError(
                f'--resume: {checkpoint} and --monitor-path {monitor} belong to '
                'different runs; give the monitor path of the run it continues'
            )
        self.identify(run or uuid.uuid4().hex)

    def claim(self):
        """Remove what a killed run left half-written; then, unless resuming, refuse folders
        that hold another run, or delete its files with --overwrite."""
        for _, folder in self.folders:
            for name in sorted(os.listdir(folder)):
                if self.run_file.fullmatch(name) and '.partial' in name:
                    remove(os.path.join(folder, name))
                    logger.info(f'removed {os.path.join(folder, name)}, left by a killed run')
        if self.resume:
            return
        for _, folder in self.folders:
            found = sorted(name for name in os.listdir(folder) if self.run_file.fullmatch(name))
            if found and not self.overwrite:
                listed = ', '.join(found[:2]) + (', ...' if len(found) > 2 else '')
                raise RunError(
                    f'{folder} holds another run ({listed}): continue it with '
                    '--resume, or delete its files with --overwrite'
                )
            for name in found:
                remove(os.path.join(folder, name))
            if found:
                logger.info(
                    f'--overwrite: deleted the {len(found)} files and folders of the earlier run in {folder}'
                )
