"""Command-line configuration of train.py. Defaults are the paper's jeans <-> skirt setting."""
import argparse


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        description='InstaGAN: instance-aware image-to-image translation (NNabla).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    data = parser.add_argument_group('data')
    data.add_argument('--dataroot', default='datasets/jeans2skirt_ccp',
                      help='folder with trainA, trainA_seg, trainB, trainB_seg '
                           '(made by datasets/generate_ccp_dataset.py)')
    data.add_argument('--loadSizeH', type=int, default=330, help='resize height before cropping')
    data.add_argument('--loadSizeW', type=int, default=220, help='resize width before cropping')
    data.add_argument('--fineSizeH', type=int, default=300, help='crop height (multiple of 4)')
    data.add_argument('--fineSizeW', type=int, default=200, help='crop width (multiple of 4)')
    data.add_argument('--no-flip', action='store_true', help='no random horizontal flips')
    data.add_argument('--ins-max', type=int, default=4,
                      help='instance slots per image (capped at the most any image has)')
    data.add_argument('--ins-per', type=int, default=2,
                      help='instance slots translated per pass of sequential mini-batch '
                           'translation (--ins-per = --ins-max: all in one pass); the cycle '
                           'and identity L1 average over 3 + --ins-per channels, as the '
                           'official code, even where fewer slots are built')
    data.add_argument('--set-order', choices=['decreasing', 'random'], default='decreasing',
                      help='order of the instances in their slots: by decreasing area, or random')

    model = parser.add_argument_group('networks')
    model.add_argument('--ngf', type=int, default=64, help='generator width')
    model.add_argument('--ndf', type=int, default=64, help='discriminator width')
    model.add_argument('--n-blocks', type=int, default=9, help='residual blocks per encoder')
    model.add_argument('--n-layers-D', type=int, default=3, help='stride-2 layers in the discriminator')

    train = parser.add_argument_group('training')
    train.add_argument('--batch-size', '-b', type=int, default=1)
    train.add_argument('--max-epoch', '-e', type=int, default=600,
                       help='the official jeans<->skirt command: 400 + 200 epochs')
    train.add_argument('--lr-decay-start-epoch', type=int, default=400,
                       help='learning rates are constant for this many epochs, then decay '
                            'linearly as the official code does (to 1/(decay epochs + 1) of '
                            'the base rate in the last epoch)')
    train.add_argument('--learning-rate-G', type=float, default=2e-4)
    train.add_argument('--learning-rate-D', type=float, default=2e-4)
    train.add_argument('--beta1', type=float, default=0.5, help='Adam beta1')
    train.add_argument('--beta2', type=float, default=0.999, help='Adam beta2')
    train.add_argument('--lambda-cyc', type=float, default=10.0, help='cycle-consistency weight')
    train.add_argument('--lambda-idt', type=float, default=10.0, help='identity-mapping weight')
    train.add_argument('--lambda-ctx', type=float, default=10.0, help='context-preserving weight')
    train.add_argument('--pool-size', type=int, default=50,
                       help='past fakes the discriminators also see (0 disables the pool)')
    train.add_argument('--seed', type=int, default=0)

    run = parser.add_argument_group('run')
    run.add_argument('--context', '-c', choices=['cpu', 'cudnn'], default=None,
                     help='default: cudnn when nnabla-ext-cuda is installed, else cpu')
    run.add_argument('--device-id', '-d', default='0')
    run.add_argument('--type-config', '-t', choices=['float', 'half', 'mixed_half'],
                     default='float')
    run.add_argument('--cpu-conv', choices=['blas', 'nnabla'], default='blas',
                     help='on cpu, run convolutions and normalisations through numpy on all '
                          'cores (blas) or through NNabla\'s one-thread kernels')
    run.add_argument('--monitor-path', '-m', default='results/monitor',
                     help='loss curves, their plots and translated samples')
    run.add_argument('--model-save-path', '-o', default='results/models', help='checkpoints')
    run.add_argument('--log-step', type=int, default=10, help='iterations per logged loss value')
    run.add_argument('--save-interval', type=int, default=1, help='epochs between checkpoints')
    run.add_argument('--keep-checkpoints', type=int, default=3, help='newest checkpoints kept')
    run.add_argument('--nan-policy', choices=['stop', 'warn'], default='stop',
                     help='on a NaN or Inf loss: stop (keeping the last checkpoint) or only warn')
    run.add_argument('--resume', action='store_true',
                     help='continue from the last checkpoint in --model-save-path')
    return parser.parse_args(argv)
