"""The device a program computes on: NNabla's default context, and on the CPU the optional
engine (cpu_engine) that moves a built graph's convolutions and normalisations onto every core;
and the memory the machine has for it.
"""

import os

import nnabla as nn
from nnabla.ext_utils import get_extension_context
from nnabla.logger import logger

from runtime import RunError

# -c cuda is nnabla-examples' spelling of the cuDNN context.
CONTEXTS = ['cpu', 'cudnn', 'cuda']
TYPE_CONFIGS = ['float']


def cuda_installed():
    try:
        import nnabla_ext.cuda  # noqa: F401 (the import is the test)

        return True
    except ImportError:
        return False


def set_context(context=None, device_id='0', type_config='float', cpu_conv='blas'):
    """Make NNabla's default context the one named (None: cudnn where nnabla-ext-cuda is
    installed, else cpu). Returns the context's name and what to apply, once, to the outputs
    of the graphs then built: cpu_engine.accelerate on the CPU with cpu_conv 'blas', else
    nothing. The engine's C loops are compiled here, so a missing compiler stops the program
    before any work."""
    if context is None:
        context = 'cudnn' if cuda_installed() else 'cpu'
        logger.info(f'context: {context} (from what is installed; choose with --context)')
    if context == 'cuda':
        context = 'cudnn'
    if context == 'cudnn' and not cuda_installed():
        raise RunError(
            '--context cudnn needs nnabla-ext-cuda, which is not installed '
            '(pip install -r requirements-cuda.txt)'
        )
    nn.set_default_context(get_extension_context(context, device_id=device_id, type_config=type_config))
    if context != 'cpu' or cpu_conv != 'blas':
        return context, lambda *outputs: None
    import cpu_engine

    try:
        cpu_engine.kernels()
    except cpu_engine.KernelsUnavailable as error:
        raise RunError(error) from None
    return context, cpu_engine.accelerate


# A container's memory limit, its use, and the statistics that say how much of that use is
# page cache it would give back (inactive_file): cgroup v2, then v1.
CGROUP_MEMORY = [
    (
        '/sys/fs/cgroup/memory.max',
        '/sys/fs/cgroup/memory.current',
        '/sys/fs/cgroup/memory.stat',
        'inactive_file',
    ),
    (
        '/sys/fs/cgroup/memory/memory.limit_in_bytes',
        '/sys/fs/cgroup/memory/memory.usage_in_bytes',
        '/sys/fs/cgroup/memory/memory.stat',
        'total_inactive_file',
    ),
]


def available_memory():
    """Bytes a new allocation can take here without swapping or the OOM killer: the kernel's
    MemAvailable, or less where a cgroup (a container) limits this process's memory; None
    where neither can be read."""
    available = None
    try:
        with open('/proc/meminfo') as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration, ValueError):
        try:
            available = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
        except (OSError, ValueError):
            pass
    for limit_file, usage_file, stat_file, cache in CGROUP_MEMORY:
        try:
            with open(limit_file) as limit, open(usage_file) as usage, open(stat_file) as stat:
                used = int(usage.read()) - sum(
                    int(line.split()[1]) for line in stat if line.split()[0] == cache
                )
                left = int(limit.read()) - used  # 'max' (no limit) is no int
        except (OSError, ValueError, IndexError):
            continue
        available = left if available is None else min(available, left)
        break
    return available


def gigabytes(size):
    return f'{size / 2**30:.1f} GiB'


def check_memory(needed, what, advice=''):
    """Refuse, in one line, a configuration whose estimated memory (models.training_memory,
    ...) is more than the machine has available: `what` names the configuration, `advice` how
    to need less."""
    available = available_memory()
    if available is not None and needed > available:
        raise RunError(
            f'{what} needs about {gigabytes(needed)} of memory (estimated from the '
            f'sizes), and this machine has {gigabytes(available)} available'
            + (f'; {advice}' if advice else '')
        )


def check_training_memory(args, ins_max, needed):
    """check_memory for train.py's flags `args` with ins_max instance slots in the data."""
    slots = f'{ins_max} instance slot{"s" * (ins_max > 1)}'
    check_memory(
        needed,
        f'--batch-size {args.batch_size} of {args.fineSizeH}x{args.fineSizeW} (load size '
        f'{args.loadSizeH}x{args.loadSizeW}) with --ngf {args.ngf} --ndf {args.ndf} '
        f'--n-blocks {args.n_blocks} and {slots}',
        'make some of these smaller',
    )
