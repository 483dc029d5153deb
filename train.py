"""Train InstaGAN on two unaligned domains of images with instance masks (x = A, y = B).

    python train.py --dataroot datasets/jeans2skirt_ccp

Every iteration translates a batch of x to y and of y to x, updates both generators on the
adversarial, cycle, identity and context-preserving losses, then both discriminators on real
images and on fakes drawn from a pool of past translations. Graphs are built once.
"""
import json
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
from types import SimpleNamespace

import numpy as np
import nnabla as nn
import nnabla.solvers as S
from nnabla.ext_utils import get_extension_context
from nnabla.logger import logger
from nnabla.monitor import Monitor, MonitorSeries, MonitorTimeElapsed
from tqdm import tqdm

import models
from args import get_args
from data import DataError, MaskedImageIterator, count_max_instances
from losses import (context_preserving_loss, discriminator_loss, image_and_masks_l1,
                    lsgan_loss)

LOSS_NAMES = ['discriminator_loss', 'generator_loss', 'reconstruction_loss',
              'identity_mapping_loss', 'context_preserving_loss']
# Arguments that decide the parameter shapes: a checkpoint only fits the same values.
NETWORK_ARGS = ['ngf', 'ndf', 'n_blocks', 'n_layers_D']


class ConfigError(Exception):
    pass


def learning_rate(base, epoch, decay_start, max_epoch):
    """Constant until `decay_start`, then linear decay reaching zero at `max_epoch`."""
    if epoch < decay_start:
        return base
    return base * max(0.0, (max_epoch - epoch) / float(max_epoch - decay_start))


class ImagePool:
    """Past translations (image and masks) shown to the discriminator (Shrivastava et al. 2017):
    once full, each new fake is swapped with a random stored one half the time."""

    def __init__(self, size, seed):
        self.size = size
        self.images, self.masks = [], []
        self.rng = np.random.RandomState(seed)

    def query(self, images, masks):
        if self.size == 0:
            return images, masks
        out_images, out_masks = images.copy(), masks.copy()
        for i in range(len(images)):
            if len(self.images) < self.size:
                self.images.append(images[i].copy())
                self.masks.append(masks[i].copy())
            elif self.rng.uniform() < 0.5:
                j = self.rng.randint(self.size)
                out_images[i], self.images[j] = self.images[j], images[i].copy()
                out_masks[i], self.masks[j] = self.masks[j], masks[i].copy()
        return out_images, out_masks

    def get_state(self):
        return {'images': self.images, 'masks': self.masks, 'rng': self.rng.get_state()}

    def set_state(self, state):
        self.images, self.masks = state['images'], state['masks']
        self.rng.set_state(state['rng'])


def get_context(args):
    if args.context is None:
        try:
            import nnabla_ext.cuda  # noqa: F401
            args.context = 'cudnn'
        except ImportError:
            args.context = 'cpu'
        logger.info('context: {} (from what is installed; choose with --context)'.format(
            args.context))
    try:
        return get_extension_context(args.context, device_id=args.device_id,
                                     type_config=args.type_config)
    except ImportError:
        raise ConfigError('--context {} needs nnabla-ext-cuda, which is not installed '
                          '(pip install -r requirements-cuda.txt)'.format(args.context))


def check_sizes(args):
    for name in ['fineSizeH', 'fineSizeW']:
        if getattr(args, name) % 4:
            raise ConfigError('--{} {} is not a multiple of 4, which the generator needs'.format(
                name, getattr(args, name)))
    if args.fineSizeH > args.loadSizeH or args.fineSizeW > args.loadSizeW:
        raise ConfigError('fine size {}x{} is larger than load size {}x{}'.format(
            args.fineSizeH, args.fineSizeW, args.loadSizeH, args.loadSizeW))


def translation_graph(args, source, source_masks, forward, backward, target_discriminator):
    """Generator-side graph of one direction, everything computed from the real source images:
    the translation, its reconstruction, the identity mapping, and their unweighted losses."""
    with nn.parameter_scope(forward):
        fake, fake_masks = models.generator(source, source_masks, args.ngf, args.n_blocks)
    with nn.parameter_scope(backward):
        rec, rec_masks = models.generator(fake, fake_masks, args.ngf, args.n_blocks)
        # A generator fed an image of its own output domain should change nothing.
        idt, idt_masks = models.generator(source, source_masks, args.ngf, args.n_blocks)
    with nn.parameter_scope(target_discriminator):
        scores = models.discriminator(fake, fake_masks, args.ndf, args.n_layers_D)
    losses = {
        'generator_loss': lsgan_loss(scores, 1.0),
        'reconstruction_loss': image_and_masks_l1(rec, rec_masks, source, source_masks),
        'identity_mapping_loss': image_and_masks_l1(idt, idt_masks, source, source_masks),
        'context_preserving_loss': context_preserving_loss(source, source_masks, fake, fake_masks),
    }
    outputs = {'fake': fake, 'fake_masks': fake_masks, 'rec': rec, 'rec_masks': rec_masks}
    for variable in list(losses.values()) + list(outputs.values()):
        variable.persistent = True
    return losses, outputs


def discriminator_graph(args, real, real_masks, scope):
    """Discriminator loss on real images and on pooled fakes fed through input variables."""
    fake, fake_masks = nn.Variable(real.shape), nn.Variable(real_masks.shape)
    with nn.parameter_scope(scope):
        real_scores = models.discriminator(real, real_masks, args.ndf, args.n_layers_D)
        fake_scores = models.discriminator(fake, fake_masks, args.ndf, args.n_layers_D)
    loss = discriminator_loss(real_scores, fake_scores)
    loss.persistent = True
    return loss, fake, fake_masks


def mask_colors(masks):
    """(N, H, W) masks in [-1, 1] -> (H, W, 3) picture, one colour per instance slot."""
    palette = np.array([[1, 0.2, 0.2], [0.2, 1, 0.2], [0.3, 0.5, 1], [1, 1, 0.2],
                        [1, 0.2, 1], [0.2, 1, 1], [1, 0.6, 0.2], [0.7, 0.7, 0.7]])
    weights = (np.clip(masks, -1, 1) + 1) / 2
    colours = palette[np.arange(len(masks)) % len(palette)]
    return np.max(weights[:, :, :, None] * colours[:, None, None, :], axis=0)


def save_tile(path, columns):
    """Write a PNG of (image, masks) pairs of sample 0 side by side: images on top, masks below."""
    import imageio
    top = np.concatenate([(image[0].transpose(1, 2, 0) + 1) / 2 for image, _ in columns], axis=1)
    bottom = np.concatenate([mask_colors(masks[0]) for _, masks in columns], axis=1)
    tile = np.clip(np.concatenate([top, bottom], axis=0), 0, 1)
    imageio.imwrite(path, (tile * 255).round().astype(np.uint8))


def plot_losses(monitor_path):
    """Redraw monitor_path/losses.png from the monitor's series files."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(LOSS_NAMES), figsize=(4 * len(LOSS_NAMES), 3.2))
    for axis, name in zip(axes, LOSS_NAMES):
        for domain in 'xy':
            path = os.path.join(monitor_path, '{}_{}.series.txt'.format(name, domain))
            if os.path.exists(path) and os.path.getsize(path):
                series = np.loadtxt(path, ndmin=2)
                axis.plot(series[:, 0], series[:, 1], label=domain)
        axis.set_title(name.replace('_', ' '))
        axis.set_xlabel('iteration')
        axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(monitor_path, 'losses.png'), dpi=80)
    plt.close(figure)


def build_graphs(args, ins_max):
    """Both directions' generator losses and both discriminators' losses, built once."""
    image_shape = (args.batch_size, 3, args.fineSizeH, args.fineSizeW)
    mask_shape = (args.batch_size, ins_max, args.fineSizeH, args.fineSizeW)
    graph = SimpleNamespace(real={d: nn.Variable(image_shape) for d in 'xy'},
                            real_masks={d: nn.Variable(mask_shape) for d in 'xy'},
                            generator_losses={}, outputs={}, discriminator_losses={}, pooled={})
    for source, target in ['xy', 'yx']:
        graph.generator_losses[source], graph.outputs[source] = translation_graph(
            args, graph.real[source], graph.real_masks[source],
            'generator_{}2{}'.format(source, target), 'generator_{}2{}'.format(target, source),
            'discriminator_' + target)
    weights = {'generator_loss': 1.0, 'reconstruction_loss': args.lambda_cyc,
               'identity_mapping_loss': args.lambda_idt,
               'context_preserving_loss': args.lambda_ctx}
    graph.generator_total = sum(weights[name] * loss
                                for losses in graph.generator_losses.values()
                                for name, loss in losses.items())
    for domain in 'xy':
        loss, fake, fake_masks = discriminator_graph(
            args, graph.real[domain], graph.real_masks[domain], 'discriminator_' + domain)
        graph.discriminator_losses[domain], graph.pooled[domain] = loss, (fake, fake_masks)
    graph.discriminator_total = graph.discriminator_losses['x'] + graph.discriminator_losses['y']
    graph.generator_total.persistent = graph.discriminator_total.persistent = True
    return graph


class TrainingStopped(Exception):
    pass


def check_finite(losses, iteration, args):
    for name, loss in losses.items():
        value = float(loss.d)
        if not math.isfinite(value):
            message = '{} is {} at iteration {}'.format(name, value, iteration)
            if args.nan_policy == 'stop':
                raise TrainingStopped(message + '; stopped before updating with it')
            logger.warning(message)


def train_step(graph, solvers, pools, iteration, args):
    """One update of both generators, then of both discriminators."""
    graph.generator_total.forward(clear_no_need_grad=True)
    check_finite({'{}_{}'.format(name, d): loss for d, losses in graph.generator_losses.items()
                  for name, loss in losses.items()}, iteration, args)
    for scope in ['generator_x2y', 'generator_y2x']:
        solvers[scope].zero_grad()
    graph.generator_total.backward(clear_buffer=True)
    for scope in ['generator_x2y', 'generator_y2x']:
        solvers[scope].update()

    for source, target in ['xy', 'yx']:
        fake, fake_masks = pools[target].query(graph.outputs[source]['fake'].d,
                                               graph.outputs[source]['fake_masks'].d)
        graph.pooled[target][0].d, graph.pooled[target][1].d = fake, fake_masks
    graph.discriminator_total.forward(clear_no_need_grad=True)
    check_finite({'discriminator_loss_' + d: loss for d, loss in
                  graph.discriminator_losses.items()}, iteration, args)
    for scope in ['discriminator_x', 'discriminator_y']:
        solvers[scope].zero_grad()
    graph.discriminator_total.backward(clear_buffer=True)
    for scope in ['discriminator_x', 'discriminator_y']:
        solvers[scope].update()


def save_tiles(graph, monitor_path, epoch):
    for source, target in ['xy', 'yx']:
        outputs = graph.outputs[source]
        save_tile(os.path.join(monitor_path, 'translation_{}2{}_epoch_{:04d}.png'.format(
            source, target, epoch)),
            [(graph.real[source].d, graph.real_masks[source].d),
             (outputs['fake'].d, outputs['fake_masks'].d),
             (outputs['rec'].d, outputs['rec_masks'].d)])


def checkpoint_paths(model_path):
    """Complete checkpoints, oldest first (a partial one has no state.json yet)."""
    names = sorted(n for n in os.listdir(model_path) if n.startswith('checkpoint_')
                   and os.path.exists(os.path.join(model_path, n, 'state.json')))
    return [os.path.join(model_path, n) for n in names]


def save_checkpoint(args, iteration, epoch, solvers, trainer_state):
    """Write model_path/checkpoint_ITERATION under a temporary name, rename it into place, and
    keep the newest --keep-checkpoints. A kill at any moment leaves the older ones intact."""
    name = 'checkpoint_{:09d}'.format(iteration)
    final = os.path.join(args.model_save_path, name)
    partial = os.path.join(args.model_save_path, '.{}.partial'.format(name))
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        nn.save_parameters(os.path.join(partial, 'parameters.h5'))
        for solver_name, solver in solvers.items():
            solver.save_states(os.path.join(partial, '{}.h5'.format(solver_name)))
        with open(os.path.join(partial, 'trainer.pkl'), 'wb') as f:
            pickle.dump(trainer_state, f)
        state = {'iteration': iteration, 'epoch': epoch, 'args': vars(args),
                 'learning_rates': {k: s.learning_rate() for k, s in solvers.items()}}
        with open(os.path.join(partial, 'state.json'), 'w') as f:
            json.dump(state, f, indent=1)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.rename(partial, final)
    for old in checkpoint_paths(args.model_save_path)[:-args.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path, solvers, args):
    with open(os.path.join(path, 'state.json')) as f:
        state = json.load(f)
    for name in NETWORK_ARGS:
        if state['args'][name] != getattr(args, name):
            raise ConfigError('{} was made with --{} {}, not {}'.format(
                path, name.replace('_', '-'), state['args'][name], getattr(args, name)))
    nn.load_parameters(os.path.join(path, 'parameters.h5'))
    for solver_name, solver in solvers.items():
        solver.load_states(os.path.join(path, '{}.h5'.format(solver_name)))
    with open(os.path.join(path, 'trainer.pkl'), 'rb') as f:
        return state['iteration'], pickle.load(f)


def create_monitors(monitor_path, interval, first_iteration):
    """Loss series and a timer. nnabla's monitors empty their files when created: a resumed run
    puts back the lines of the iterations before its first one (later lines belong to
    iterations that are being redone)."""
    kept = {}
    for name in os.listdir(monitor_path):
        if name.endswith(('.series.txt', '.timer.txt')):
            with open(os.path.join(monitor_path, name)) as f:
                kept[name] = [line for line in f if int(line.split()[0]) < first_iteration]
    monitor = Monitor(monitor_path)
    series = {'{}_{}'.format(name, d): MonitorSeries('{}_{}'.format(name, d), monitor, interval,
                                                    verbose=False)
              for name in LOSS_NAMES for d in 'xy'}
    elapsed = MonitorTimeElapsed('elapsed_time', monitor, interval, verbose=False)
    for recorder in list(series.values()) + [elapsed]:
        with open(recorder.sp, 'w') as f:
            f.writelines(kept.get(os.path.basename(recorder.sp), []))
        # where an uninterrupted run last wrote a line: it writes every `interval` iterations
        recorder.flush_at = first_iteration - first_iteration % interval - 1
    return series, elapsed


class StopSignals:
    """Turns the first SIGINT or SIGTERM into a request to checkpoint and stop after the
    current iteration; a second one interrupts at once."""

    def __init__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        logger.info('{}: stopping after this iteration'.format(self.received))

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def check_writable(path):
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError('{} is not writable ({})'.format(path, error.strerror))


def train(args):
    check_sizes(args)
    nn.set_default_context(get_context(args))
    models.use_blas_convolution(args.context == 'cpu' and args.cpu_conv == 'blas')
    check_writable(args.monitor_path)
    check_writable(args.model_save_path)
    nn.clear_parameters()
    nn.seed(args.seed)  # parameter initialisers draw from nnabla's own generator

    ins_max = min(args.ins_max, count_max_instances(args.dataroot, 'train'))
    logger.info('instance slots per image: {}'.format(ins_max))
    loaders = {domain: MaskedImageIterator(
        args.dataroot, 'train', letter, args.batch_size,
        load_size=(args.loadSizeH, args.loadSizeW), fine_size=(args.fineSizeH, args.fineSizeW),
        ins_max=ins_max, flip=not args.no_flip, set_order=args.set_order, seed=args.seed + i)
        for i, (domain, letter) in enumerate([('x', 'A'), ('y', 'B')])}
    iterations_per_epoch = math.ceil(max(l.size for l in loaders.values()) / args.batch_size)
    graph = build_graphs(args, ins_max)

    base_rates = {'generator_x2y': args.learning_rate_G, 'generator_y2x': args.learning_rate_G,
                  'discriminator_x': args.learning_rate_D, 'discriminator_y': args.learning_rate_D}
    solvers = {}
    for scope, base in base_rates.items():
        solvers[scope] = S.Adam(base, args.beta1, args.beta2)
        with nn.parameter_scope(scope):
            solvers[scope].set_parameters(nn.get_parameters())
    pools = {d: ImagePool(args.pool_size, args.seed + 10 + i) for i, d in enumerate('xy')}

    iteration = 0
    if args.resume:
        checkpoints = checkpoint_paths(args.model_save_path)
        if not checkpoints:
            raise ConfigError('--resume: no checkpoint in {}'.format(args.model_save_path))
        iteration, trainer_state = load_checkpoint(checkpoints[-1], solvers, args)
        for d, pool in pools.items():
            pool.set_state(trainer_state['pools'][d])
        for d, loader in loaders.items():
            loader.set_state(trainer_state['loaders'][d])
        logger.info('resumed from {} at iteration {}'.format(checkpoints[-1], iteration))
    series, elapsed = create_monitors(args.monitor_path, args.log_step, iteration)
    if args.resume:
        for name, buffered in trainer_state['series'].items():
            series[name].buf = buffered

    def checkpoint():
        trainer_state = {'pools': {d: pool.get_state() for d, pool in pools.items()},
                         'series': {k: s.buf for k, s in series.items()},
                         'loaders': {d: loader.get_state() for d, loader in loaders.items()}}
        return save_checkpoint(args, iteration, iteration // iterations_per_epoch, solvers,
                               trainer_state)

    stop = StopSignals()
    try:
        while iteration < args.max_epoch * iterations_per_epoch:
            epoch = iteration // iterations_per_epoch
            for scope, solver in solvers.items():
                solver.set_learning_rate(learning_rate(
                    base_rates[scope], epoch, args.lr_decay_start_epoch, args.max_epoch))
            progress = tqdm(initial=iteration % iterations_per_epoch, total=iterations_per_epoch,
                            desc='epoch {}/{}'.format(epoch + 1, args.max_epoch),
                            leave=False, dynamic_ncols=True)
            while iteration < (epoch + 1) * iterations_per_epoch:
                for d in 'xy':
                    graph.real[d].d, graph.real_masks[d].d = loaders[d].next()
                train_step(graph, solvers, pools, iteration, args)
                for d in 'xy':
                    series['discriminator_loss_' + d].add(
                        iteration, float(graph.discriminator_losses[d].d))
                    for name, loss in graph.generator_losses[d].items():
                        series['{}_{}'.format(name, d)].add(iteration, float(loss.d))
                elapsed.add(iteration)
                iteration += 1
                progress.update()
                progress.set_postfix(G=float(graph.generator_total.d),
                                     D=float(graph.discriminator_total.d))
                if stop.received:
                    progress.close()
                    raise TrainingStopped('{} at iteration {}: saved {}; continue with --resume'
                                          .format(stop.received, iteration, checkpoint()))
            progress.close()
            save_tiles(graph, args.monitor_path, epoch + 1)
            plot_losses(args.monitor_path)
            if (epoch + 1) % args.save_interval == 0 or epoch + 1 == args.max_epoch:
                logger.info('epoch {}: saved {}'.format(epoch + 1, checkpoint()))
    finally:
        stop.restore()
        for loader in loaders.values():
            loader.close()


def main(argv=None):
    args = get_args(argv)
    try:
        train(args)
    except (ConfigError, DataError, TrainingStopped) as error:
        sys.exit('train.py: {}'.format(error))


if __name__ == '__main__':
    main()
