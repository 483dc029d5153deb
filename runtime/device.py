"""The device a program computes on: NNabla's default context, and on the CPU the optional
engine (cpu_engine) that moves a built graph's convolutions and normalisations onto every core.
"""

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
