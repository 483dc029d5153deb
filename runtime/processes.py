"""Who made a file, and whether that process still runs.

A record names a process by host, pid, the boot id of the machine's kernel
(/proc/sys/kernel/random/boot_id) and the process's start time (field 22 of /proc/PID/stat,
clock ticks after boot): a pid alone is reused by unrelated processes, and after a restart
(of the machine, or of a container, whose processes start again from low pids) a pid that
runs is another process. Where /proc does not exist (macOS) the two are None and only the pid
is checked.
"""

import json
import os
import socket
import tempfile
from pathlib import Path

OWNER_FILE = 'staging.json'  # in a folder made by make_owned_folder


def boot_id():
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f.read().strip()
    except OSError:
        return None


def start_time(pid):
    """When `pid` started, in clock ticks after boot; None if it does not run or /proc is
    unreadable."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            stat = f.read()
    except OSError:
        return None
    # Field 2, the command name in parentheses, may hold spaces and parentheses itself.
    fields = stat[stat.rindex(b')') + 2 :].split()
    return int(fields[22 - 3])


def this_process():
    pid = os.getpid()
    return {'pid': pid, 'host': socket.gethostname(), 'boot_id': boot_id(), 'start_time': start_time(pid)}


def process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def why_gone(record):
    """Why the process of `record` (this_process() of a process on this host; boot_id and
    start_time may be missing, as in records of earlier versions) no longer runs, in words;
    None if it may still run."""
    pid, boot = record['pid'], record.get('boot_id')
    if boot is not None and boot_id() is not None and boot != boot_id():
        return 'the machine has restarted since'
    if not process_exists(pid):
        return 'no process has that pid now'
    started = record.get('start_time')
    if started is not None and start_time(pid) not in (None, started):
        return f'pid {pid} is now another process'
    return None


def make_owned_folder(parent, prefix):
    """A new folder in `parent` whose name starts with `prefix` and whose OWNER_FILE names this
    process, so that a later run can tell whether it was left by one that is gone."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (folder / OWNER_FILE).write_text(json.dumps(this_process()) + '\n')
    return folder


def left_by_ended_processes(parent, prefix):
    """(folder, owner record, why it is gone) of each folder make_owned_folder(parent, prefix)
    made for a process of this host that no longer runs (kill -9 leaves them behind). Any
    other (of a live process, of another host, a link, or not such a folder) is left out."""
    for name in sorted(os.listdir(parent)):
        path = Path(parent) / name
        if not name.startswith(prefix) or path.is_symlink():
            continue
        try:
            owner = json.loads((path / OWNER_FILE).read_text())
            gone = owner['host'] == this_process()['host'] and why_gone(owner)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if gone:
            yield path, owner, gone
