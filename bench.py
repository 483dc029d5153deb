"""Benchmark the training iteration of train.py, the data iterator, or translation.

    python bench.py --config paper            # 300x200, ngf = ndf = 64, 9 blocks
    python bench.py --config small --json     # 64x64, ngf = ndf = 16

`--what train` times Trainer.step exactly as train.py runs it (same graphs, solvers and data
iterators) and compares the median with a floor: the convolution FLOPs of one iteration
(forward, input gradient and weight gradient) at the matmul rate numpy reaches here.
"""
from args import exit_at_once, handle_stop_signals

if __name__ == '__main__':  # a benchmark has nothing to save; the imports below take a while
    handle_stop_signals(exit_at_once)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import nnabla as nn  # noqa: E402

import models  # noqa: E402
import train  # noqa: E402
from args import get_args, non_negative_int, positive_int  # noqa: E402
from data import DataError, list_images, mask_paths  # noqa: E402

CONFIGS = {
    'paper': ['--loadSizeH', '330', '--loadSizeW', '220', '--fineSizeH', '300',
              '--fineSizeW', '200', '--ngf', '64', '--ndf', '64'],
    'small': ['--loadSizeH', '72', '--loadSizeW', '72', '--fineSizeH', '64', '--fineSizeW', '64',
              '--ngf', '16', '--ndf', '16'],
}


def matmul_gflops(size=2048, repeats=5):
    a = np.random.rand(size, size).astype(np.float32)
    b = np.random.rand(size, size).astype(np.float32)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def convolution_flops(root):
    """2 x multiply-adds of every (transposed) convolution in the graph of `root`, times 3:
    forward, input gradient and weight gradient, the convention of the reference figures
    (train.py skips some of these gradients, which then shows as speed)."""
    multiply_adds = []

    def visit(function):
        name = function.info.type_name
        if 'Convolution' not in name:
            return
        x, weight = function.inputs[:2]
        per_element = weight.size // weight.shape[0]
        # A convolution's weight is (out, in, kh, kw); a transposed one's (in, out, kh, kw).
        elements = x.size if 'Deconvolution' in name else function.outputs[0].size
        multiply_adds.append(elements * per_element)

    root.visit(visit)
    return 3 * 2 * sum(multiply_adds)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summary(seconds):
    return {'median': float(np.median(seconds)), 'min': float(np.min(seconds)),
            'max': float(np.max(seconds))}


def bench_train(args, warmup, iterations):
    # Before accelerate, which leaves numpy's BLAS on one thread (its passes share the cores).
    rate = matmul_gflops()
    accelerate = train.set_context(args)
    nn.seed(args.seed)
    ins_max, loaders = train.make_loaders(args)
    trainer = train.Trainer(args, ins_max)
    accelerate(*trainer.graph_outputs())
    trainer.set_epoch(0)
    flops = trainer.passes * sum(convolution_flops(root) for root in trainer.graph_outputs())
    seconds = []
    for i in range(warmup + iterations):
        images, masks = train.next_batches(loaders)
        start = time.perf_counter()
        trainer.step(images, masks, i)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
        print('iteration {}: {:.3f} s'.format(i, time.perf_counter() - start), flush=True)
    for loader in loaders.values():
        loader.close()
    floor = flops / (rate * 1e9)
    return {'sec_per_iter': summary(seconds), 'peak_rss_mb': peak_rss_mb(),
            'flops_per_iter': flops, 'matmul_gflops': rate, 'floor_sec': floor,
            'floor_ratio': float(np.median(seconds)) / floor}


def bench_data(args, warmup, iterations):
    ins_max, loaders = train.make_loaders(args)
    for _ in range(warmup):
        train.next_batches(loaders)
    start = time.perf_counter()
    for _ in range(iterations):
        train.next_batches(loaders)
    elapsed = time.perf_counter() - start
    for loader in loaders.values():
        loader.close()
    samples = 2 * iterations * args.batch_size
    return {'samples_per_sec': samples / elapsed, 'peak_rss_mb': peak_rss_mb()}


def bench_translate(args, warmup, iterations):
    """Images per second of translate.py's Translator on trainA of --dataroot, random weights."""
    import translate
    accelerate = train.set_context(args)
    nn.seed(args.seed)
    params = os.path.join(args.model_save_path, 'bench_parameters.h5')
    os.makedirs(args.model_save_path, exist_ok=True)
    with nn.parameter_scope('generator_x2y'):
        models.generator(nn.Variable((1, 3, 32, 32)), nn.Variable((1, 1, 32, 32)),
                         args.ngf, args.n_blocks)
    nn.save_parameters(params)
    translator = translate.Translator(SimpleNamespace(
        params=params, direction='AtoB', ngf=args.ngf, n_blocks=args.n_blocks,
        ins_per=args.ins_per, fineSizeH=args.fineSizeH, fineSizeW=args.fineSizeW))
    accelerate(translator.image_out, translator.masks_out)
    os.makedirs(args.monitor_path, exist_ok=True)
    inputs = [(path, mask_paths(path)) for path in
              list_images(os.path.join(args.dataroot, 'trainA'))]
    seconds = []
    for i in range(warmup + iterations):
        path, masks = inputs[i % len(inputs)]
        start = time.perf_counter()
        translate.translate_one(translator, str(path), masks, args.monitor_path)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
    return {'images_per_sec': 1 / float(np.median(seconds)), 'peak_rss_mb': peak_rss_mb()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', choices=sorted(CONFIGS), default='small')
    parser.add_argument('--what', choices=['train', 'data', 'translate'], default='train')
    parser.add_argument('--warmup', type=non_negative_int, default=2,
                        help='untimed iterations first')
    parser.add_argument('--iters', type=positive_int, default=5, help='timed iterations')
    parser.add_argument('--json', action='store_true', help='end with one line of JSON')
    options, train_flags = parser.parse_known_args()
    # Any train.py flag may follow, e.g. --dataroot, --cpu-conv nnabla, --batch-size 4.
    args = get_args(['--dataroot', 'datasets/ccp_sample', '--monitor-path', 'results/bench',
                     '--model-save-path', 'results/bench'] + CONFIGS[options.config] + train_flags)
    bench = {'train': bench_train, 'data': bench_data, 'translate': bench_translate}
    try:
        result = bench[options.what](args, options.warmup, options.iters)
    except (train.ConfigError, DataError, OSError) as error:
        sys.exit(f'bench.py: {error}')
    result.update(config=options.config, what=options.what, batch_size=args.batch_size,
                  context=args.context, cpu_conv=args.cpu_conv)
    for key, value in result.items():
        print('{:>16}: {}'.format(key, value))
    if options.json:
        print(json.dumps(result))


if __name__ == '__main__':
    main()
