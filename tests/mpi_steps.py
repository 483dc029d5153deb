"""Runs k training iterations of train.Trainer in this process, alone or as one rank of an
mpiexec launch, and saves what tests/test_distributed.py compares: the losses of each step
(the mean over the ranks), every parameter, and the generators' outputs on a fixed input.

    python tests/mpi_steps.py OUT STEPS [train.py flags]            # one process
    mpiexec -n 2 python tests/mpi_steps.py OUT STEPS [flags]        # OUT/rank_R.npz each

With the environment variable NAN_RANK=R, rank R's images become NaN from the second step.
"""

import os
import sys

import nnabla as nn
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train
from args import get_args
from data import Loaders
from runtime import RunError
from runtime.device import set_context
from runtime.distributed import start_processes


def main():
    out, steps, flags = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    args = get_args(flags)
    processes, device_id = start_processes('cpu', '0')
    set_context('cpu', device_id, 'float', args.cpu_conv)
    nn.seed(args.seed)
    loaders = Loaders.of(args, share=(processes.rank, processes.size))
    with loaders:
        trainer = train.Trainer(args, loaders.ins_max, processes)
        processes.broadcast_parameters(nn.get_parameters(grad_only=False), trainer.solvers)
        trainer.set_epoch(0)
        losses = []
        try:
            for step in range(steps):
                images, masks = loaders.next_batches()
                if str(processes.rank) == os.environ.get('NAN_RANK') and step >= 1:
                    images['x'][:] = np.nan
                step_losses, _, _ = trainer.step(images, masks, step)
                losses.append(
                    [processes.mean_losses(step_losses, train.SERIES)[name] for name in train.SERIES]
                )
        except RunError as error:
            sys.exit(f'rank {processes.rank}: {error}')
    rng = np.random.RandomState(7)
    image = rng.uniform(-1, 1, (1, 3, args.fineSizeH, args.fineSizeW)).astype(np.float32)
    masks = np.where(rng.rand(1, trainer.ins_per, args.fineSizeH, args.fineSizeW) > 0.5, 1.0, -1.0).astype(
        np.float32
    )
    outputs = {}
    for scope in train.GENERATORS:
        with nn.parameter_scope(scope), nn.no_grad():
            image_out, masks_out = train.models.generator(
                nn.Variable.from_numpy_array(image),
                nn.Variable.from_numpy_array(masks),
                args.ngf,
                args.n_blocks,
            )
        nn.forward_all([image_out, masks_out])
        outputs[f'{scope}/image'], outputs[f'{scope}/masks'] = image_out.d, masks_out.d
    parameters = {f'parameter/{k}': v.d for k, v in nn.get_parameters(grad_only=False).items()}
    np.savez(
        os.path.join(out, f'rank_{processes.rank}.npz'), losses=np.array(losses), **outputs, **parameters
    )


if __name__ == '__main__':
    main()
