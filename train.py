"""Train InstaGAN on two unaligned domains of images with instance masks (x = A, y = B).

    python train.py --dataroot datasets/jeans2skirt_ccp

Every iteration takes a batch of each domain and runs the passes of sequential mini-batch
translation (paper section 2.3): pass i translates instance slots [i K, (i+1) K) on top of
the image translated by the earlier passes. Each pass updates both generators on the
adversarial, cycle, identity and context-preserving losses, then both discriminators on real
images and on fakes drawn from a pool of past translations. Graphs are built once.
"""
import gc
import json
import math
import os
import pickle
import shutil
import signal
import sys
import tempfile
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import nnabla as nn
import nnabla.functions as F
import nnabla.solvers as S
from nnabla.ext_utils import get_extension_context
from nnabla.logger import logger
from nnabla.monitor import Monitor, MonitorSeries, MonitorTimeElapsed
from PIL import Image
from tqdm import tqdm

import cpu_functions
import models
from args import get_args
from data import DataError, MaskedImageIterator, count_max_instances
from losses import (context_preserving_loss, discriminator_loss, image_and_masks_l1,
                    lsgan_loss)

LOSS_NAMES = ['discriminator_loss', 'generator_loss', 'reconstruction_loss',
              'identity_mapping_loss', 'context_preserving_loss']
# Arguments that decide the parameter shapes: a checkpoint only fits the same values.
NETWORK_ARGS = ['ngf', 'ndf', 'n_blocks', 'n_layers_D']
GENERATORS = ['generator_x2y', 'generator_y2x']


class ConfigError(Exception):
    pass


class TrainingStopped(Exception):
    pass


def learning_rate(base, epoch, decay_start, max_epoch):
    """The official schedule for epoch 0, 1, ...: constant for `decay_start` epochs, then
    linear decay, base * (1 - (epoch + 1 - decay_start) / (max_epoch - decay_start + 1))."""
    decay_epochs = max_epoch - decay_start
    return base * (1.0 - max(0, epoch + 1 - decay_start) / float(decay_epochs + 1))


class ImagePool:
    """Past translations (image and masks) shown to the discriminator (Shrivastava et al. 2017):
    once full, each new fake is swapped with a random stored one half the time."""

    def __init__(self, size, seed):
        self.size = size
        self.images, self.masks = [], []
        self.rng = np.random.RandomState(seed)

    def query(self, images, masks, active):
        """Fakes for the discriminator in place of `images`, `masks`; samples not `active` (no
        instance translated) neither enter the pool nor come back from it."""
        out_images, out_masks = images.copy(), masks.copy()
        if self.size == 0:
            return out_images, out_masks
        for i in np.flatnonzero(active):
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


def check_finite(losses, iteration, args):
    for name, loss in losses.items():
        value = float(loss.d)
        if not math.isfinite(value):
            message = '{} is {} at iteration {}'.format(name, value, iteration)
            if args.nan_policy == 'stop':
                raise TrainingStopped(message + '; stopped before updating with it')
            logger.warning(message)


def next_batches(loaders):
    """({domain: images}, {domain: masks}) of the next batch of every domain."""
    batches = {d: loader.next() for d, loader in loaders.items()}
    return {d: b[0] for d, b in batches.items()}, {d: b[1] for d, b in batches.items()}


class Trainer:
    """The graphs, solvers and image pools of InstaGAN, and one training iteration.

    Pass graphs are built once for K = --ins-per slots and serve every pass. With M = --ins-max
    slots (rounded up to a multiple of K), the discriminators see an image with all M slots:
    those translated so far, the current pass's, and empty ones for the passes to come.
    """

    def __init__(self, args, ins_max):
        self.args = args
        self.ins_per = min(args.ins_per, ins_max)
        self.passes = math.ceil(ins_max / self.ins_per)
        self.slots = self.passes * self.ins_per
        self.image_shape = (args.batch_size, 3, args.fineSizeH, args.fineSizeW)
        self.directions = {s: self.direction_graph(s, t) for s, t in ['xy', 'yx']}
        self.discriminators = {d: self.discriminator_graph(d) for d in 'xy'}
        self.base_rates = {'generator_x2y': args.learning_rate_G,
                           'generator_y2x': args.learning_rate_G,
                           'discriminator_x': args.learning_rate_D,
                           'discriminator_y': args.learning_rate_D}
        self.solvers = {}
        for scope, base in self.base_rates.items():
            self.solvers[scope] = S.Adam(base, args.beta1, args.beta2)
            with nn.parameter_scope(scope):
                self.solvers[scope].set_parameters(nn.get_parameters())
        self.pools = {d: ImagePool(args.pool_size, args.seed + 10 + i) for i, d in enumerate('xy')}
        self.visuals = {}

    def mask_shape(self, slots):
        return self.image_shape[:1] + (slots,) + self.image_shape[2:]

    def direction_graph(self, source, target):
        """Generator-side graph of one pass of source -> target: the translation, its
        reconstruction, the identity mapping of the source image, and their losses, averaged
        over the samples that have instances in the pass."""
        args = self.args
        graph = SimpleNamespace(image=nn.Variable(self.image_shape),
                                masks=nn.Variable(self.mask_shape(self.ins_per)), held_masks=None)
        with nn.parameter_scope('generator_{}2{}'.format(source, target)):
            graph.fake, graph.fake_masks, active = models.generator_pass(
                graph.image, graph.masks, args.ngf, args.n_blocks)
        with nn.parameter_scope('generator_{}2{}'.format(target, source)):
            graph.rec, graph.rec_masks = models.generator(
                graph.fake, graph.fake_masks, args.ngf, args.n_blocks)
            # A generator fed an image of its own output domain should change nothing.
            idt, idt_masks = models.generator(graph.image, graph.masks, args.ngf, args.n_blocks)
        all_fake_masks = graph.fake_masks
        if self.slots > self.ins_per:  # the slots of the other passes, fed from numpy
            graph.held_masks = nn.Variable(self.mask_shape(self.slots - self.ins_per))
            all_fake_masks = F.concatenate(graph.fake_masks, graph.held_masks, axis=1)
        with nn.parameter_scope('discriminator_' + target):
            scores = models.discriminator(graph.fake, all_fake_masks, args.ndf, args.n_layers_D,
                                          fix_parameters=True)
        graph.losses = {
            'generator_loss': lsgan_loss(scores, 1.0, active),
            'reconstruction_loss': image_and_masks_l1(graph.rec, graph.rec_masks, graph.image,
                                                      graph.masks, active, args.ins_per),
            'identity_mapping_loss': image_and_masks_l1(idt, idt_masks, graph.image, graph.masks,
                                                        active, args.ins_per),
            'context_preserving_loss': context_preserving_loss(
                graph.image, graph.masks, graph.fake, graph.fake_masks, active),
        }
        # The identity mapping does not depend on the translation: a graph of its own, run
        # before the other, so that their activations are never held at the same time.
        graph.identity_loss = args.lambda_idt * graph.losses['identity_mapping_loss']
        graph.translation_loss = (graph.losses['generator_loss']
                                  + args.lambda_cyc * graph.losses['reconstruction_loss']
                                  + args.lambda_ctx * graph.losses['context_preserving_loss'])
        for variable in [graph.identity_loss, graph.translation_loss, graph.fake,
                         graph.fake_masks, graph.rec, graph.rec_masks] + list(graph.losses.values()):
            variable.persistent = True
        return graph

    def discriminator_graph(self, domain):
        """Discriminator loss on real images and on pooled fakes, all fed from numpy."""
        args = self.args
        graph = SimpleNamespace(real=nn.Variable(self.image_shape),
                                real_masks=nn.Variable(self.mask_shape(self.slots)),
                                fake=nn.Variable(self.image_shape),
                                fake_masks=nn.Variable(self.mask_shape(self.slots)),
                                fake_weights=nn.Variable(self.image_shape[:1]))
        with nn.parameter_scope('discriminator_' + domain):
            real_scores = models.discriminator(graph.real, graph.real_masks, args.ndf,
                                               args.n_layers_D)
            fake_scores = models.discriminator(graph.fake, graph.fake_masks, args.ndf,
                                               args.n_layers_D)
        graph.loss = discriminator_loss(real_scores, fake_scores, graph.fake_weights)
        graph.loss.persistent = True
        return graph

    def graph_outputs(self):
        """The variables whose graphs hold every function the iteration runs. What it reads
        besides them is persistent, so cpu_functions.accelerate keeps it too."""
        return [loss for graph in self.directions.values()
                for loss in (graph.identity_loss, graph.translation_loss)] + \
            [graph.loss for graph in self.discriminators.values()]

    def set_epoch(self, epoch):
        for scope, solver in self.solvers.items():
            solver.set_learning_rate(learning_rate(
                self.base_rates[scope], epoch, self.args.lr_decay_start_epoch,
                self.args.max_epoch))

    def step(self, images, masks, iteration):
        """One training iteration on a batch of each domain (dicts over 'x', 'y' of numpy
        images and masks). Returns the losses averaged over the passes that ran, and the
        number of passes run: those with an instance in some sample of either domain."""
        K = self.ins_per
        empty = np.full(self.mask_shape(self.slots - masks['x'].shape[1]), -1, np.float32)
        masks = {d: np.concatenate([m, empty], axis=1) for d, m in masks.items()}
        current = dict(images)  # each domain's images as translated by the passes so far
        translated = {d: np.full_like(masks[d], -1) for d in 'xy'}
        losses = defaultdict(list)
        passes_run = 0
        for p in range(self.passes):
            pass_slots = slice(p * K, (p + 1) * K)
            active = {d: np.any(masks[d][:, pass_slots] > -1, axis=(1, 2, 3)) for d in 'xy'}
            running = [d for d in 'xy' if active[d].any()]
            if not running:
                continue
            passes_run += 1

            for scope in GENERATORS:
                self.solvers[scope].zero_grad()
            for s in running:
                graph = self.directions[s]
                graph.image.d, graph.masks.d = current[s], masks[s][:, pass_slots]
                if graph.held_masks is not None:
                    graph.held_masks.d = np.delete(translated[s], range(p * K, (p + 1) * K), axis=1)
                for loss in [graph.identity_loss, graph.translation_loss]:
                    loss.forward(clear_no_need_grad=True)
                    loss.backward(clear_buffer=True)
                check_finite({'{}_{}'.format(name, s): loss
                              for name, loss in graph.losses.items()}, iteration, self.args)
            for scope in GENERATORS:
                self.solvers[scope].update()

            for s in running:
                t = 'y' if s == 'x' else 'x'
                graph, discriminator = self.directions[s], self.discriminators[t]
                translated[s][:, pass_slots] = graph.fake_masks.d
                discriminator.real.d, discriminator.real_masks.d = images[t], masks[t]
                discriminator.fake.d, discriminator.fake_masks.d = self.pools[t].query(
                    graph.fake.d, translated[s], active[s])
                discriminator.fake_weights.d = active[s]
                discriminator.loss.forward(clear_no_need_grad=True)
                check_finite({'discriminator_loss_' + t: discriminator.loss}, iteration,
                             self.args)
                self.solvers['discriminator_' + t].zero_grad()
                discriminator.loss.backward(clear_buffer=True)
                self.solvers['discriminator_' + t].update()
                losses['discriminator_loss_' + t].append(float(discriminator.loss.d))
                for name, loss in graph.losses.items():
                    losses['{}_{}'.format(name, s)].append(float(loss.d))

                rec_masks = np.full_like(masks[s], -1)
                rec_masks[:, pass_slots] = graph.rec_masks.d
                current[s] = graph.fake.d.copy()
                self.visuals[s] = [(images[s], masks[s]), (current[s], translated[s].copy()),
                                   (graph.rec.d.copy(), rec_masks)]
        return {name: float(np.mean(values)) for name, values in losses.items()}, passes_run

    def get_state(self):
        return {d: pool.get_state() for d, pool in self.pools.items()}

    def set_state(self, state):
        for d, pool in self.pools.items():
            pool.set_state(state[d])


def cuda_installed():
    try:
        import nnabla_ext.cuda  # noqa: F401
        return True
    except ImportError:
        return False


def set_context(args):
    """Make the default context the one --context names (resolving its default). Returns what to
    apply, once, to the outputs of the graphs then built: on the CPU with --cpu-conv blas,
    cpu_functions.accelerate, which moves their convolutions and normalisations onto numpy."""
    if args.context is None:
        args.context = 'cudnn' if cuda_installed() else 'cpu'
        logger.info('context: {} (from what is installed; choose with --context)'.format(
            args.context))
    elif args.context == 'cudnn' and not cuda_installed():
        raise ConfigError('--context cudnn needs nnabla-ext-cuda, which is not installed '
                          '(pip install -r requirements-cuda.txt)')
    nn.set_default_context(get_extension_context(args.context, device_id=args.device_id,
                                                 type_config=args.type_config))
    if args.context == 'cpu' and args.cpu_conv == 'blas':
        return cpu_functions.accelerate
    return lambda *outputs: None  # NNabla's own kernels, as built


def check_sizes(args):
    for name in ['fineSizeH', 'fineSizeW']:
        if getattr(args, name) % 4:
            raise ConfigError('--{} {} is not a multiple of 4, which the generator needs'.format(
                name, getattr(args, name)))
        # Each stride-2 layer of the discriminator halves the size; its last two 4x4
        # convolutions take one pixel each.
        smallest = 3 * 2 ** args.n_layers_D
        if getattr(args, name) < smallest:
            raise ConfigError('--{} {} is too small for --n-layers-D {} (at least {})'.format(
                name, getattr(args, name), args.n_layers_D, smallest))
    if args.fineSizeH > args.loadSizeH or args.fineSizeW > args.loadSizeW:
        raise ConfigError('fine size {}x{} is larger than load size {}x{}'.format(
            args.fineSizeH, args.fineSizeW, args.loadSizeH, args.loadSizeW))


def check_writable(path):
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError('{} is not writable ({})'.format(path, error.strerror))


def image_panel(images):
    """Sample 0 of (B, 3, H, W) images in [-1, 1] -> (H, W, 3) in [0, 1]."""
    return (np.clip(images[0], -1, 1).transpose(1, 2, 0) + 1) / 2


def mask_panel(masks):
    """Sample 0 of (B, N, H, W) masks in [-1, 1] -> (H, W, 3), one colour per instance slot."""
    palette = np.array([[1, 0.2, 0.2], [0.2, 1, 0.2], [0.3, 0.5, 1], [1, 1, 0.2],
                        [1, 0.2, 1], [0.2, 1, 1], [1, 0.6, 0.2], [0.7, 0.7, 0.7]])
    weights = (np.clip(masks[0], -1, 1) + 1) / 2
    colours = palette[np.arange(len(weights)) % len(palette)]
    return np.max(weights[:, :, :, None] * colours[:, None, None, :], axis=0)


def write_png(path, array):
    """Write uint8 (H, W) or (H, W, 3) under a temporary name, then rename into place."""
    partial = path[:-len('.png')] + '.partial.png'
    Image.fromarray(array).save(partial)
    os.replace(partial, path)


def save_tile(path, rows):
    """Write rows of (H, W, 3) panels in [0, 1] as one PNG."""
    tile = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
    write_png(path, (tile * 255).round().astype(np.uint8))


def save_translation_tiles(trainer, monitor_path, epoch):
    """Source, translation and reconstruction of each direction: images on top, masks below."""
    for source, target in ['xy', 'yx']:
        columns = trainer.visuals.get(source)
        if columns:
            save_tile(os.path.join(monitor_path, 'translation_{}2{}_epoch_{:04d}.png'.format(
                source, target, epoch)), [[image_panel(image) for image, _ in columns],
                                          [mask_panel(masks) for _, masks in columns]])


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
    # A figure is a web of reference cycles: left to the collector's own schedule, a few
    # dozen accumulate (tens of MB) before they are freed.
    gc.collect()


def checkpoint_paths(model_path):
    """Complete checkpoints, oldest first (a partial one has no state.json yet)."""
    names = sorted(n for n in os.listdir(model_path) if n.startswith('checkpoint_')
                   and os.path.exists(os.path.join(model_path, n, 'state.json')))
    return [os.path.join(model_path, n) for n in names]


def save_checkpoint(args, iteration, epoch, solvers, training_state):
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
            pickle.dump(training_state, f)
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


def make_loaders(args):
    """The slot count (--ins-max capped at the most instances any image has) and one
    independently shuffled iterator per domain: x reads trainA, y trainB."""
    if not os.path.isdir(args.dataroot):
        raise DataError('{}: dataset folder not found (datasets/generate_ccp_dataset.py makes '
                        'one)'.format(args.dataroot))
    ins_max = min(args.ins_max, count_max_instances(args.dataroot, 'train'))
    loaders = {domain: MaskedImageIterator(
        args.dataroot, 'train', letter, args.batch_size,
        load_size=(args.loadSizeH, args.loadSizeW), fine_size=(args.fineSizeH, args.fineSizeW),
        ins_max=ins_max, flip=not args.no_flip, set_order=args.set_order, seed=args.seed + i)
        for i, (domain, letter) in enumerate([('x', 'A'), ('y', 'B')])}
    return ins_max, loaders


def train(args):
    check_sizes(args)
    accelerate = set_context(args)
    nn.clear_parameters()
    nn.seed(args.seed)  # parameter initialisers draw from nnabla's own generator
    ins_max, loaders = make_loaders(args)  # checks the dataset before anything is written
    check_writable(args.monitor_path)
    check_writable(args.model_save_path)
    iterations_per_epoch = math.ceil(max(l.size for l in loaders.values()) / args.batch_size)
    trainer = Trainer(args, ins_max)
    accelerate(*trainer.graph_outputs())
    logger.info('instance slots per image: {}, translated in {} pass(es) of {}'.format(
        ins_max, trainer.passes, trainer.ins_per))

    iteration = 0
    if args.resume:
        checkpoints = checkpoint_paths(args.model_save_path)
        if not checkpoints:
            raise ConfigError('--resume: no checkpoint in {}'.format(args.model_save_path))
        iteration, saved = load_checkpoint(checkpoints[-1], trainer.solvers, args)
        trainer.set_state(saved['trainer'])
        for d, loader in loaders.items():
            loader.set_state(saved['loaders'][d])
        logger.info('resumed from {} at iteration {}'.format(checkpoints[-1], iteration))
    series, elapsed = create_monitors(args.monitor_path, args.log_step, iteration)
    if args.resume:
        for name, buffered in saved['series'].items():
            series[name].buf = buffered

    def checkpoint():
        state = {'trainer': trainer.get_state(),
                 'series': {name: recorder.buf for name, recorder in series.items()},
                 'loaders': {d: loader.get_state() for d, loader in loaders.items()}}
        return save_checkpoint(args, iteration, iteration // iterations_per_epoch,
                               trainer.solvers, state)

    stop = StopSignals()
    try:
        while iteration < args.max_epoch * iterations_per_epoch:
            epoch = iteration // iterations_per_epoch
            trainer.set_epoch(epoch)
            # A context, so that the bar is gone before an error message is printed.
            with tqdm(initial=iteration % iterations_per_epoch, total=iterations_per_epoch,
                      desc='epoch {}/{}'.format(epoch + 1, args.max_epoch), leave=False,
                      dynamic_ncols=True) as progress:
                while iteration < (epoch + 1) * iterations_per_epoch:
                    losses, _ = trainer.step(*next_batches(loaders), iteration)
                    for name, value in losses.items():
                        series[name].add(iteration, value)
                    elapsed.add(iteration)
                    iteration += 1
                    progress.update()
                    progress.set_postfix({name: '{:.3g}'.format(losses[name]) for name in
                                          ['generator_loss_x', 'discriminator_loss_y']
                                          if name in losses})
                    if stop.received:
                        raise TrainingStopped('{} at iteration {}: saved {}; continue with '
                                              '--resume'.format(stop.received, iteration,
                                                                checkpoint()))
            save_translation_tiles(trainer, args.monitor_path, epoch + 1)
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
