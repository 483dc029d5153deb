"""Command-line configuration of train.py (nnabla-examples' get_args). Defaults are the paper's
jeans <-> skirt setting.

Every value is checked as it is parsed: a bad one gets argparse's one-line usage error (exit
status 2) before anything is loaded or written. The flag types are shared by the programs.
"""

import argparse
import math
import re

import models
from runtime.device import CONTEXTS, TYPE_CONFIGS


def checked(convert, accept, requirement):
    """An argparse type: `convert` the text, and refuse it unless `accept(value)`."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f'{text!r} is not {requirement}')
        return value

    parse.requirement = requirement
    return parse


positive_int = checked(int, lambda v: v >= 1, 'a positive integer')
non_negative_int = checked(int, lambda v: v >= 0, 'an integer >= 0')
seed = checked(int, lambda v: 0 <= v < 2**31, 'an integer from 0 to 2**31 - 1')
non_negative_float = checked(float, lambda v: math.isfinite(v) and v >= 0, 'a finite number >= 0')
adam_beta = checked(float, lambda v: 0 <= v < 1, 'a number in [0, 1)')
device_id = checked(str, lambda v: re.fullmatch('[0-9]+', v), 'a device number')
path = checked(str, lambda v: v != '', 'a path')


def generator_size(size):
    """A height or width the generator takes (models.check_sizes); train.py also checks the
    discriminator's."""
    try:
        models.check_sizes(size, size)
    except ValueError:
        return False
    return True


network_size = checked(int, generator_size, 'a multiple of 4, at least 8')


def h5_file(text):
    if not path(text).endswith('.h5'):
        raise argparse.ArgumentTypeError(f'{text} is not a .h5 file')
    return text


def add_model_flags(parser):
    """-o/--params: a trained model in any form translator.find_parameters takes."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        '--model-save-path',
        '-o',
        type=path,
        help="a model: a training run's --model-save-path (its newest checkpoint), a "
        'checkpoint folder or a pretrained/ folder',
    )
    model.add_argument('--params', type=h5_file, help='a parameters.h5 file')


# generate_ccp_dataset.py's default: the smallest instance --split-instances keeps, as a share
# of the photo.
MIN_INSTANCE_AREA = 0.002


def add_instance_rule_flags(group):
    """--split-instances and --min-instance-area: how a predicted region becomes instances."""
    group.add_argument(
        '--split-instances',
        action='store_true',
        help='each 8-connected part of a region is an instance, as with '
        'generate_ccp_dataset.py --split-instances (without it the whole region is one)',
    )
    group.add_argument(
        '--min-instance-area',
        type=checked(float, lambda v: 0 <= v < 1, 'a number in [0, 1)'),
        help='with --split-instances: the smallest instance, as a share of the photo '
        f'({MIN_INSTANCE_AREA} when not given, as generate_ccp_dataset.py)',
    )


def check_instance_rule(parser, args):
    """Refuse --min-instance-area without --split-instances, then give it its default."""
    if args.min_instance_area is not None and not args.split_instances:
        parser.error('--min-instance-area goes with --split-instances')
    if args.min_instance_area is None:
        args.min_instance_area = MIN_INSTANCE_AREA


def build_parser():
    parser = argparse.ArgumentParser(
        description='InstaGAN: instance-aware image-to-image translation (NNabla).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    data = parser.add_argument_group('data')
    data.add_argument(
        '--dataroot',
        type=path,
        default='datasets/jeans2skirt_ccp',
        help='folder with trainA, trainA_seg, trainB, trainB_seg (made by datasets/generate_ccp_dataset.py)',
    )
    data.add_argument('--loadSizeH', type=positive_int, default=330, help='resize height before cropping')
    data.add_argument('--loadSizeW', type=positive_int, default=220, help='resize width before cropping')
    data.add_argument('--fineSizeH', type=positive_int, default=300, help='crop height (multiple of 4)')
    data.add_argument('--fineSizeW', type=positive_int, default=200, help='crop width (multiple of 4)')
    data.add_argument('--no-flip', action='store_true', help='no random horizontal flips')
    data.add_argument(
        '--ins-max',
        type=positive_int,
        default=4,
        help='instance slots per image (capped at the most any image has)',
    )
    data.add_argument(
        '--ins-per',
        type=positive_int,
        default=2,
        help='instance slots translated per pass of sequential mini-batch '
        'translation (--ins-per = --ins-max: all in one pass); the cycle '
        'and identity L1 average over 3 + --ins-per channels, as the '
        'official code, even where fewer slots are built',
    )
    data.add_argument(
        '--set-order',
        choices=['decreasing', 'random'],
        default='decreasing',
        help='order of the instances in their slots: by decreasing area, or random',
    )

    model = parser.add_argument_group('networks')
    model.add_argument('--ngf', type=positive_int, default=64, help='generator width')
    model.add_argument('--ndf', type=positive_int, default=64, help='discriminator width')
    model.add_argument('--n-blocks', type=non_negative_int, default=9, help='residual blocks per encoder')
    model.add_argument(
        '--n-layers-D', type=positive_int, default=3, help='stride-2 layers in the discriminator'
    )

    train = parser.add_argument_group('training')
    train.add_argument('--batch-size', '-b', type=positive_int, default=1)
    train.add_argument(
        '--max-epoch',
        '-e',
        type=positive_int,
        default=600,
        help='the official jeans<->skirt command: 400 + 200 epochs',
    )
    train.add_argument(
        '--lr-decay-start-epoch',
        type=non_negative_int,
        default=None,
        help='learning rates are constant for this many epochs, then decay '
        'linearly as the official code does (to 1/(decay epochs + 1) of '
        'the base rate in the last epoch); at most --max-epoch; default: '
        'two thirds of --max-epoch, the official 400 of 600',
    )
    train.add_argument('--learning-rate-G', '--learning-rate_G', type=non_negative_float, default=2e-4)
    train.add_argument('--learning-rate-D', '--learning-rate_D', type=non_negative_float, default=2e-4)
    train.add_argument('--beta1', type=adam_beta, default=0.5, help='Adam beta1')
    train.add_argument('--beta2', type=adam_beta, default=0.999, help='Adam beta2')
    train.add_argument('--lambda-cyc', type=non_negative_float, default=10.0, help='cycle-consistency weight')
    train.add_argument('--lambda-idt', type=non_negative_float, default=10.0, help='identity-mapping weight')
    train.add_argument(
        '--lambda-ctx', type=non_negative_float, default=10.0, help='context-preserving weight'
    )
    train.add_argument(
        '--pool-size',
        type=non_negative_int,
        default=50,
        help='past fakes the discriminators also see (0 disables the pool)',
    )
    train.add_argument('--seed', type=seed, default=0)

    run = parser.add_argument_group('run')
    run.add_argument(
        '--context',
        '-c',
        choices=CONTEXTS,
        default=None,
        help='default: cudnn when nnabla-ext-cuda is installed, else cpu (cuda is another name for cudnn)',
    )
    run.add_argument('--device-id', '-d', type=device_id, default='0')
    run.add_argument('--type-config', '-t', choices=TYPE_CONFIGS, default='float')
    run.add_argument(
        '--cpu-conv',
        choices=['blas', 'nnabla'],
        default='blas',
        help='on cpu, run convolutions and normalisations through BLAS and C loops '
        "on all cores (blas; needs a C compiler) or through NNabla's "
        'one-thread kernels',
    )
    run.add_argument(
        '--monitor-path',
        '-m',
        type=path,
        default='results/monitor',
        help='loss curves, their plots and translated samples',
    )
    run.add_argument('--model-save-path', '-o', type=path, default='results/models', help='checkpoints')
    run.add_argument('--log-step', type=positive_int, default=10, help='iterations per logged loss value')
    run.add_argument('--save-interval', type=positive_int, default=1, help='epochs between checkpoints')
    run.add_argument('--keep-checkpoints', type=positive_int, default=3, help='newest checkpoints kept')
    run.add_argument(
        '--nan-policy',
        choices=['stop', 'warn'],
        default='stop',
        help='on a NaN or Inf loss: stop (keeping the last checkpoint) or only warn',
    )
    start = run.add_mutually_exclusive_group()
    start.add_argument(
        '--resume',
        action='store_true',
        help='continue from the newest intact checkpoint in --model-save-path',
    )
    start.add_argument(
        '--overwrite',
        action='store_true',
        help="start afresh where another run wrote: delete that run's "
        'checkpoints, loss series and pictures first',
    )
    return parser


def flag(name):
    """The command-line spelling of an argument: flag('batch_size') == '--batch-size'."""
    return '--' + name.replace('_', '-')


# How --resume treats a flag given another value than the checkpoint was made with. These
# decide the data stream, the shapes or the saved state: the run is refused.
FIXED_ON_RESUME = [
    'loadSizeH',
    'loadSizeW',
    'fineSizeH',
    'fineSizeW',
    'no_flip',
    'ins_max',
    'ins_per',
    'set_order',
    'ngf',
    'ndf',
    'n_blocks',
    'n_layers_D',
    'batch_size',
    'pool_size',
    'seed',
]
# These may change; each change gets a line. The learning rates always follow the schedule
# of the current --learning-rate-G/D, --lr-decay-start-epoch and --max-epoch.
CHANGEABLE_ON_RESUME = [
    'max_epoch',
    'lr_decay_start_epoch',
    'learning_rate_G',
    'learning_rate_D',
    'beta1',
    'beta2',
    'lambda_cyc',
    'lambda_idt',
    'lambda_ctx',
    'context',
    'device_id',
    'type_config',
    'cpu_conv',
    'monitor_path',
    'log_step',
    'save_interval',
    'keep_checkpoints',
    'nan_policy',
]
# Where the checkpoint is read from and how the run starts are not compared; the dataset is
# compared by its resolved path and the names of its files, not by --dataroot's spelling.
NOT_COMPARED_ON_RESUME = ['model_save_path', 'resume', 'overwrite', 'dataroot']


def get_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.context == 'cuda':
        args.context = 'cudnn'
    try:
        models.check_sizes(args.fineSizeH, args.fineSizeW, args.n_layers_D)
    except ValueError as error:
        parser.error(f'--fineSizeH {args.fineSizeH} --fineSizeW {args.fineSizeW}: {error}')
    if args.fineSizeH > args.loadSizeH or args.fineSizeW > args.loadSizeW:
        parser.error(
            f'fine size {args.fineSizeH}x{args.fineSizeW} is larger than load size '
            f'{args.loadSizeH}x{args.loadSizeW}'
        )
    if args.lr_decay_start_epoch is None:
        args.lr_decay_start_epoch = round(args.max_epoch * 2 / 3)
    elif args.lr_decay_start_epoch > args.max_epoch:
        parser.error(
            f'--lr-decay-start-epoch {args.lr_decay_start_epoch} is beyond --max-epoch {args.max_epoch}'
        )
    return args
