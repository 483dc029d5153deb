"""Benchmark a training iteration of train.py, the data loaders, or translation.

    python bench.py --config paper            # 300x200, ngf = ndf = 64, 9 blocks
    python bench.py --config small --json     # 64x64, ngf = ndf = 16

`--what train` runs train.py itself for enough epochs and reads the seconds of each iteration
from its elapsed_time.timer.txt (--log-step 1; checkpoints and pictures fall between epochs and
are not counted), so that what is timed is exactly what train.py runs. Its peak memory is the
child's. Any other train.py flag may follow, e.g. --dataroot, --cpu-conv nnabla,
--batch-size 4. `--processes N` runs train.py under `mpiexec -n N` and also reports the
seconds per sample of the global batch. `--what translate` times one photo through the
Translator (reading and resizing included, writing not); `mpiexec -n N python bench.py --what
allreduce` times the all-reduce of every gradient of one iteration.
"""

from runtime.signals import exit_at_once, handle_stop_signals

if __name__ == '__main__':  # a benchmark has nothing to save; the imports below take a while
    handle_stop_signals(exit_at_once)

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import nnabla as nn
import nnabla.solvers as S
import numpy as np

import models
from args import get_args, non_negative_int, positive_int
from data import Loaders, check_dataroot, list_images, load_with_masks, mask_paths, resize_with_masks
from runtime import RunError
from runtime.device import check_memory, set_context
from runtime.distributed import start_processes
from runtime.signals import StopRequest
from translator import NetworkConfig, Translator, check_translation_memory

TRAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')
MPIEXEC = os.path.join(os.path.dirname(sys.executable), 'mpiexec')
CONFIGS = {
    'paper': [
        '--loadSizeH',
        '330',
        '--loadSizeW',
        '220',
        '--fineSizeH',
        '300',
        '--fineSizeW',
        '200',
        '--ngf',
        '64',
        '--ndf',
        '64',
    ],
    'small': [
        '--loadSizeH',
        '72',
        '--loadSizeW',
        '72',
        '--fineSizeH',
        '64',
        '--fineSizeW',
        '64',
        '--ngf',
        '16',
        '--ndf',
        '16',
    ],
}


def matmul_gflops(size=2048, repeats=5):
    a = np.random.rand(size, size).astype(np.float32)
    b = np.random.rand(size, size).astype(np.float32)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def peak_rss_mb(who=resource.RUSAGE_SELF):
    return resource.getrusage(who).ru_maxrss / 1024


def summary(seconds):
    return {'median': float(np.median(seconds)), 'min': float(np.min(seconds)), 'max': float(np.max(seconds))}


def bench_train(args, flags, warmup, iterations, processes=1):
    """Seconds per iteration of train.py on the benchmark's flags, under `mpiexec -n
    processes` if more than one; an iteration then takes a global batch of processes x
    --batch-size."""
    rate = matmul_gflops()
    check_dataroot(args.dataroot)
    sizes = [len(list_images(os.path.join(args.dataroot, f'train{d}'))) for d in 'AB']
    global_batch = args.batch_size * processes
    epochs = math.ceil((warmup + iterations) / math.ceil(max(sizes) / global_batch))
    with tempfile.TemporaryDirectory() as folder:
        timer = os.path.join(folder, 'elapsed_time.timer.txt')
        launcher = [MPIEXEC, '-n', str(processes)] if processes > 1 else []
        command = launcher + [
            sys.executable,
            TRAIN,
            *flags,
            '--max-epoch',
            str(epochs),
            '--save-interval',
            str(epochs),
            '--log-step',
            '1',
            '--monitor-path',
            folder,
            '--model-save-path',
            folder,
        ]
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        with StopRequest(before_exit=[child.kill]):
            seconds = []
            while len(seconds) < warmup + iterations and child.poll() is None:
                time.sleep(0.2)
                lines = open(timer).read().splitlines() if os.path.exists(timer) else []
                for line in lines[len(seconds) :]:
                    seconds.append(float(line.split()[1]))
                    print(f'iteration {len(seconds) - 1}: {seconds[-1]:.3f} s', flush=True)
            child.kill()
            _, errors = child.communicate()
    if len(seconds) < warmup + iterations:
        last = (errors.strip().splitlines() or ['train.py ended early'])[-1]
        raise RunError(last.removeprefix('train.py: '))
    median = float(np.median(seconds[warmup:]))
    return {
        'sec_per_iter': summary(seconds[warmup:]),
        'processes': processes,
        'sec_per_global_sample': median / global_batch,
        'peak_rss_mb': peak_rss_mb(resource.RUSAGE_CHILDREN),
        'matmul_gflops': rate,
    }


def bench_allreduce(args, flags, warmup, iterations, processes=1):
    """Seconds to average the generators' and the discriminators' gradients over the ranks
    (what one iteration of one pass in both directions all-reduces); run it under mpiexec."""
    processes, _ = start_processes('cpu', '0')
    image, masks = nn.Variable((1, 3, 32, 32)), nn.Variable((1, 2, 32, 32))
    solvers = {}
    for scope in ['generator_x2y', 'generator_y2x', 'discriminator_x', 'discriminator_y']:
        with nn.parameter_scope(scope):
            if scope.startswith('generator'):
                models.generator(image, masks, args.ngf, args.n_blocks)
            else:
                models.discriminator(image, masks, args.ndf, args.n_layers_D)
            solvers[scope] = S.Adam()
            solvers[scope].set_parameters(nn.get_parameters())
    for parameter in nn.get_parameters().values():
        parameter.g = np.random.rand(*parameter.shape)
    seconds = []
    for i in range(warmup + iterations):
        processes.barrier()
        start = time.perf_counter()
        for solver in solvers.values():
            processes.mean_gradients(solver)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    volume = sum(p.size for p in nn.get_parameters().values()) * 4
    if processes.rank:
        sys.exit(0)
    return {'sec_per_iter': summary(seconds), 'processes': processes.size, 'megabytes_per_iter': volume / 1e6}


def bench_data(args, flags, warmup, iterations, processes=1):
    loaders = Loaders.of(args)
    with loaders:
        check_memory(
            loaders.memory(), f'--batch-size {args.batch_size} of load size {args.loadSizeH}x{args.loadSizeW}'
        )
        for _ in range(warmup):
            loaders.next_batches()
        start = time.perf_counter()
        for _ in range(iterations):
            loaders.next_batches()
        elapsed = time.perf_counter() - start
    samples = 2 * iterations * args.batch_size
    return {'samples_per_sec': samples / elapsed, 'peak_rss_mb': peak_rss_mb()}


def bench_translate(args, flags, warmup, iterations, processes=1):
    """Photos per second through a Translator of random weights, on trainA of --dataroot."""
    config = NetworkConfig(args.ngf, args.n_blocks, args.ins_per, args.fineSizeH, args.fineSizeW)
    check_translation_memory(config)  # before the random generator is made
    _, accelerate = set_context(args.context, args.device_id, args.type_config, args.cpu_conv)
    nn.seed(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        params = os.path.join(folder, 'parameters.h5')
        with nn.parameter_scope('generator_x2y'):
            models.generator(
                nn.Variable((1, 3, 32, 32)), nn.Variable((1, 1, 32, 32)), args.ngf, args.n_blocks
            )
        nn.save_parameters(params)
        nn.clear_parameters()
        translator = Translator(params, 'AtoB', config)
    accelerate(*translator.outputs())
    inputs = [(path, mask_paths(path)) for path in list_images(os.path.join(args.dataroot, 'trainA'))]
    seconds = []
    for i in range(warmup + iterations):
        path, masks = inputs[i % len(inputs)]
        start = time.perf_counter()
        translator(*resize_with_masks(*load_with_masks(path, masks), translator.size))
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return {'images_per_sec': 1 / float(np.median(seconds)), 'peak_rss_mb': peak_rss_mb()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', choices=sorted(CONFIGS), default='small')
    parser.add_argument(
        '--what',
        choices=['train', 'data', 'translate', 'allreduce'],
        default='train',
        help='allreduce: run under mpiexec',
    )
    parser.add_argument('--warmup', type=non_negative_int, default=2, help='untimed iterations first')
    parser.add_argument('--iters', type=positive_int, default=5, help='timed iterations')
    parser.add_argument(
        '--processes',
        type=positive_int,
        default=1,
        help='with --what train: ranks of a data-parallel run under mpiexec',
    )
    parser.add_argument('--json', action='store_true', help='end with one line of JSON')
    options, train_flags = parser.parse_known_args()
    flags = ['--dataroot', 'datasets/ccp_sample'] + CONFIGS[options.config] + train_flags
    args = get_args(flags)
    bench = {
        'train': bench_train,
        'data': bench_data,
        'translate': bench_translate,
        'allreduce': bench_allreduce,
    }
    try:
        result = bench[options.what](args, flags, options.warmup, options.iters, options.processes)
    except RunError as error:
        sys.exit(f'bench.py: {error}')
    result.update(
        config=options.config,
        what=options.what,
        batch_size=args.batch_size,
        context=args.context,
        cpu_conv=args.cpu_conv,
    )
    for key, value in result.items():
        print(f'{key:>16}: {value}')
    if options.json:
        print(json.dumps(result))


if __name__ == '__main__':
    main()
