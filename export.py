"""Export a trained generator as an NNabla .nnp and an ONNX model, each checked against NNabla.

    python export.py -o pretrained/jeans2skirt_64x44 --direction both --format both \\
        --ins-per 1 --out results/export

Writes, per direction and format, generator_{DIRECTION}_{H}x{W}_k{K}.{nnp,onnx}: one pass of
sequential translation, image (1, 3, H, W) and K masks (1, K, H, W) in, translated_image and
translated_masks out, NCHW, values -1..1, an empty slot all -1 (docs/deploy.md). Each file is
run once, as written, on a real photo with its masks (by default the first of
datasets/ccp_sample/trainA, or trainB for BtoA, resized to the network size) next to the NNabla
graph; the largest absolute difference is printed, and a file above 1e-5 (nnp) or 1e-4 (onnx)
is not kept and the exit status is non-zero.
"""

from runtime.signals import exit_at_once, handle_stop_signals

if __name__ == '__main__':  # before the slow imports, so that a Ctrl-C during them ends alike
    handle_stop_signals(exit_at_once)

import argparse
import os
import sys
import time

import numpy as np

import exporting
from args import add_model_flags, checked, path
from data import check_out_folder
from runtime import RunError
from runtime.device import set_context
from runtime.files import make_writable_folder
from runtime.signals import StopRequest, exit_status
from translator import DIRECTIONS, FLAG_TYPES, Translator, find_parameters, network_config

ROOT = os.path.dirname(os.path.abspath(__file__))
CHECK_DATAROOT = os.path.join(ROOT, 'datasets', 'ccp_sample')
opset = checked(
    int,
    lambda v: v in exporting.OPSETS,
    'an opset this generator exports at (' + ', '.join(map(str, exporting.OPSETS)) + ')',
)


def get_parser():
    parser = argparse.ArgumentParser(
        prog='export.py',
        description=__doc__.split('\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_flags(parser)
    parser.add_argument('--direction', choices=list(DIRECTIONS) + ['both'], default='both')
    parser.add_argument('--format', choices=['nnp', 'onnx', 'both'], default='both')
    parser.add_argument(
        '--out', required=True, type=path, help='output folder: not the model folder, not in a dataset'
    )
    parser.add_argument('--opset', type=opset, default=11, help='ONNX opset')
    check = parser.add_argument_group(
        'check', 'the real input each file is run on next to NNabla (resized to the network size)'
    )
    inputs = check.add_mutually_exclusive_group()
    inputs.add_argument(
        '--check-image',
        type=path,
        help='a photo; its masks from --check-masks or beside it in the dataset layout '
        '(DIR_seg/NAME_0.png, ...)',
    )
    inputs.add_argument(
        '--check-dataroot',
        type=path,
        help='a dataset folder: the first image of {phase}A (AtoB) or {phase}B (BtoA) '
        f'[default: {os.path.relpath(CHECK_DATAROOT)}]',
    )
    check.add_argument('--check-masks', nargs='+', type=path, help='with --check-image')
    check.add_argument('--check-phase', type=path, default='train', help='with --check-dataroot')
    check.add_argument(
        '--check-all', action='store_true', help='check on every image of the folder, not the first'
    )
    check.add_argument(
        '--time',
        type=checked(int, lambda v: v >= 0, 'an integer >= 0'),
        default=0,
        metavar='ROUNDS',
        help='also time onnxruntime and NNabla (plain and --cpu-conv blas) per image over the '
        'check inputs, the median of ROUNDS rounds',
    )
    network = parser.add_argument_group('network', 'default: as saved with the model')
    network.add_argument('--fineSizeH', type=FLAG_TYPES['fineSizeH'], help='network height (a multiple of 4)')
    network.add_argument('--fineSizeW', type=FLAG_TYPES['fineSizeW'], help='network width (a multiple of 4)')
    network.add_argument('--ins-per', type=FLAG_TYPES['ins_per'], help='K, the instance slots of one pass')
    return parser


def get_args(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.check_masks and not args.check_image:
        parser.error('--check-masks goes with --check-image')
    if args.check_image and args.check_all:
        parser.error('--check-all goes with a folder (--check-dataroot), not --check-image')
    args.directions = list(DIRECTIONS) if args.direction == 'both' else [args.direction]
    args.formats = ['nnp', 'onnx'] if args.format == 'both' else [args.format]
    return args


def prepare(args):
    """The model's parameter file, its network configuration and each direction's check
    inputs, every check made before anything is written."""
    params_file = find_parameters(args.model_save_path or args.params)
    given = {'fineSizeH': args.fineSizeH, 'fineSizeW': args.fineSizeW, 'ins_per': args.ins_per}
    config = network_config(params_file, given)
    inputs, files_read = {}, [params_file]
    for direction in args.directions:
        if args.check_image:
            inputs[direction] = exporting.check_inputs(config, image=args.check_image, masks=args.check_masks)
            files_read += [args.check_image] + list(args.check_masks or [])
        else:
            folder = os.path.join(args.check_dataroot or CHECK_DATAROOT, args.check_phase + direction[0])
            inputs[direction] = exporting.check_inputs(config, folder=folder, every=args.check_all)
    check_out_folder(
        args.out,
        files_read,
        {'--model-save-path': args.model_save_path, '--check-dataroot': args.check_dataroot},
    )
    make_writable_folder(args.out, '--out')
    return params_file, config, inputs


def seconds_per_input(runs, inputs, rounds):
    """{name: the median over `rounds` of the seconds runs[name] takes per input}. Each input
    goes through every runner in turn, so that a busy moment of the machine (its cores are
    shared) falls on all alike; one unmeasured round goes first."""
    times = {name: [] for name in runs}
    for _ in range(rounds + 1):
        spent = dict.fromkeys(runs, 0.0)
        for image, masks in inputs:
            for name, run in runs.items():
                start = time.perf_counter()
                run(image, masks)
                spent[name] += time.perf_counter() - start
        for name in runs:
            times[name].append(spent[name] / len(inputs))
    return {name: float(np.median(measured[1:])) for name, measured in times.items()}


RUNTIME_NAMES = {'nnp': 'NnpLoader', 'onnx': 'onnxruntime'}


def time_runtimes(params_file, direction, config, inputs, written, rounds):
    """One line of per-image times: each written file in its runtime, and NNabla's graph, plain
    and accelerated by the CPU engine (--cpu-conv blas)."""
    runs = {f'{RUNTIME_NAMES[fmt]} ({fmt})': exporting.RUNNERS[fmt](file) for fmt, file in written.items()}
    for cpu_conv in ['nnabla', 'blas']:
        _, accelerate = set_context('cpu', cpu_conv=cpu_conv)
        with exporting.own_parameters():
            translator = Translator(params_file, direction, config)
        accelerate(*translator.outputs())
        runs[f'NNabla --cpu-conv {cpu_conv}'] = translator
    set_context('cpu', cpu_conv='nnabla')
    times = seconds_per_input(runs, inputs, rounds)
    listed = ', '.join(f'{name} {seconds * 1000:.1f} ms' for name, seconds in times.items())
    return (
        f'{direction} time per image (one pass, K={config.ins_per}, median of {rounds} rounds '
        f'over {len(inputs)} input(s)): {listed}'
    )


def export_direction(args, params_file, config, direction, inputs):
    """Export and check one direction; returns {format: file written}."""
    references = exporting.reference_outputs(params_file, direction, config, inputs)
    files = exporting.export_bytes(params_file, direction, config, args.formats, args.opset)
    written = {}
    for fmt, data in files.items():
        file = os.path.join(args.out, exporting.file_name(direction, config, fmt))
        difference = exporting.write_checked(file, data, fmt, inputs, references)
        written[fmt] = file
        print(
            f'export.py: {direction} {fmt}: {file} ({len(data) / 1e6:.2f} MB); largest difference '
            f'from NNabla {difference:.3g} over {len(inputs)} input(s) '
            f'(limit {exporting.LIMITS[fmt]:g})',
            flush=True,
        )
    return written


def main(argv=None):
    args = get_args(argv)
    try:
        set_context('cpu', cpu_conv='nnabla')  # plain NNabla functions: what the files hold
        params_file, config, inputs = prepare(args)
    except RunError as error:
        sys.exit(f'export.py: {error}')

    with StopRequest('stopping after this direction') as stop:
        for direction in args.directions:
            try:
                stop.deferring = True  # a file is written and checked whole, or not at all
                written = export_direction(args, params_file, config, direction, inputs[direction])
                stop.deferring = False
                if args.time and not stop.received:
                    print(
                        'export.py: '
                        + time_runtimes(
                            params_file, direction, config, inputs[direction], written, args.time
                        ),
                        flush=True,
                    )
            except RunError as error:
                sys.exit(f'export.py: {error}')
            if stop.received:
                break
    if stop.received:
        print(f'export.py: stopped by {stop.name}', file=sys.stderr)
        sys.exit(exit_status(stop.received))


if __name__ == '__main__':
    main()
