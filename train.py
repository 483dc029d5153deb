"""Train InstaGAN on two unaligned domains of images with instance masks (x = A, y = B).

    python train.py --dataroot datasets/jeans2skirt_ccp

Every iteration takes a batch of each domain and runs the passes of sequential mini-batch
translation (paper section 2.3): pass i translates instance slots [i K, (i+1) K) on top of
the image translated by the earlier passes. Each pass updates both generators on the
adversarial, cycle, identity and context-preserving losses, then both discriminators on real
images and on fakes drawn from a pool of past translations. Graphs are built once.
"""
import os
import signal

if __name__ == '__main__':
    # Until train() takes the signals over, Ctrl-C (say, while nnabla loads below) ends the
    # process with one line: a KeyboardInterrupt inside an import prints a traceback, and
    # nnabla's teardown after one has crashed. The imports follow on purpose (flake8 E402).
    def stop_while_starting(signum, frame):
        os.write(2, f'\ntrain.py: {signal.Signals(signum).name}: stopped before training '
                    'started\n'.encode())
        os._exit(1)

    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # as for a shell's background job
            signal.signal(signum, stop_while_starting)

import gc
import math
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import nnabla as nn
import nnabla.functions as F
import nnabla.solvers as S
from nnabla.ext_utils import get_extension_context
from nnabla.logger import logger
from PIL import Image
from tqdm import tqdm

import cpu_functions
import models
from args import FLAGS, get_args
from checkpoints import (DamagedCheckpoint, FolderInUse, FolderLock, checkpoint_folders,
                         load_parameters_and_solvers, read_checkpoint, save_checkpoint)
from checkpoints import checkpoint_paths  # noqa: F401 (translate.py imports it from here)
from data import DataError, MaskedImageIterator, count_max_instances, load_resized
from losses import (context_preserving_loss, discriminator_loss, image_and_masks_l1,
                    lsgan_loss)

LOSS_NAMES = ['discriminator_loss', 'generator_loss', 'reconstruction_loss',
              'identity_mapping_loss', 'context_preserving_loss']
SERIES = [f'{name}_{d}' for name in LOSS_NAMES for d in 'xy']
TIME_SERIES = 'seconds_per_iteration'
GENERATORS = ['generator_x2y', 'generator_y2x']
OTHER = {'x': 'y', 'y': 'x'}

# Everything a run writes into its folders, temporary names included: a fresh run refuses
# folders holding any of it, and --overwrite deletes it (nothing else).
RUN_FILE = re.compile(r'\.?checkpoint_\d{9}(\.partial|\.damaged)?'
                      rf'|({"|".join(SERIES + [TIME_SERIES])})\.series(\.partial)?\.txt'
                      r'|elapsed_time\.timer\.txt'  # written by earlier versions
                      r'|(losses|translation_(x2y|y2x)_epoch_\d{4,})(\.partial)?\.png')

# How --resume treats a flag given another value than the checkpoint was made with.
# These decide the data stream, the shapes or the saved state: the checkpoint cannot go on
# under a new value, so the run is refused.
FIXED_ON_RESUME = ['dataroot', 'loadSizeH', 'loadSizeW', 'fineSizeH', 'fineSizeW', 'no_flip',
                   'ins_max', 'ins_per', 'set_order', 'ngf', 'ndf', 'n_blocks', 'n_layers_D',
                   'batch_size', 'pool_size', 'seed']
# These may change; each change gets a line. The learning rates always follow the schedule
# of the current --learning-rate-G/D, --lr-decay-start-epoch and --max-epoch.
CHANGEABLE_ON_RESUME = ['max_epoch', 'lr_decay_start_epoch', 'learning_rate_G',
                        'learning_rate_D', 'beta1', 'beta2', 'lambda_cyc', 'lambda_idt',
                        'lambda_ctx', 'context', 'device_id', 'type_config', 'cpu_conv',
                        'monitor_path', 'log_step', 'save_interval', 'keep_checkpoints',
                        'nan_policy']
# Where the checkpoint is read from and how the run starts are not compared.
NOT_COMPARED_ON_RESUME = ['model_save_path', 'resume', 'overwrite']


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

    def state_dict(self):
        return {'images': np.array(self.images, np.float32),
                'masks': np.array(self.masks, np.float32), 'rng': self.rng.get_state()}

    def load_state_dict(self, state, image_shape, mask_shape):
        """`state` of a pool of this size holding (3, H, W) images with (M, H, W) masks."""
        images, masks = state['images'], state['masks']
        if not len(images) == len(masks) <= self.size or len(images) and (
                images.shape[1:] != image_shape or masks.shape[1:] != mask_shape):
            raise ValueError(f'a pool of {images.shape} images and {masks.shape} masks does '
                             f'not fit a pool of {self.size} {image_shape} and {mask_shape}')
        self.images, self.masks = list(images), list(masks)
        self.rng.set_state(tuple(state['rng']))


def check_finite(losses, iteration, args):
    for name, loss in losses.items():
        value = float(loss.d)
        if not math.isfinite(value):
            message = f'{name} is {value} at iteration {iteration}'
            if args.nan_policy == 'stop':
                raise TrainingStopped(message + '; stopped before updating with it')
            logger.warning(message)


def next_batches(loaders):
    """({domain: images}, {domain: masks}) of the next batch of every domain."""
    batches = {d: loader.next() for d, loader in loaders.items()}
    return {d: b[0] for d, b in batches.items()}, {d: b[1] for d, b in batches.items()}


def keep_values(*variables):
    """The step reads these after forward(clear_no_need_grad=True) and
    backward(clear_buffer=True), which free every buffer not marked persistent."""
    for variable in variables:
        variable.persistent = True


@dataclass
class PassGraph:
    """Generator side of one pass of source -> target, for K = --ins-per slots of M."""
    image: nn.Variable        # the source images as translated by the earlier passes
    masks: nn.Variable        # the pass's K source masks
    other_masks: nn.Variable  # the M - K masks D sees beside the pass's translated ones
    fake: nn.Variable
    fake_masks: nn.Variable
    rec: nn.Variable          # the reconstruction target -> source of the translation
    rec_masks: nn.Variable
    losses: dict              # the generator-side terms of LOSS_NAMES, unweighted
    identity_loss: nn.Variable     # weighted; see Trainer.direction_graph
    translation_loss: nn.Variable  # the other terms, weighted


@dataclass
class DiscriminatorGraph:
    """Discriminator loss on real images and on pooled fakes, all fed from numpy."""
    real: nn.Variable
    real_masks: nn.Variable
    fake: nn.Variable
    fake_masks: nn.Variable
    fake_weights: nn.Variable  # 1 for the samples with an instance translated, else 0
    loss: nn.Variable


@dataclass
class PassState:
    """One pass of sequential translation in an iteration; dicts are over the domains."""
    slots: slice       # the instance slots the pass translates
    real_images: dict  # the batch
    real_masks: dict   # its masks, all M slots
    images: dict       # the images as translated by the earlier passes; the pass replaces them
    translated: dict   # the masks translated so far, -1 (empty) elsewhere; the pass fills `slots`
    active: dict = field(init=False)  # (B,) bool: the samples with an instance in `slots`

    def __post_init__(self):
        self.active = {d: np.any(m[:, self.slots] > -1, axis=(1, 2, 3))
                       for d, m in self.real_masks.items()}

    @property
    def sources(self):
        """The domains translated in this pass: those with an instance in some sample."""
        return [d for d in 'xy' if self.active[d].any()]

    def masks_beside(self, source):
        """The masks D sees beside the pass's own translated ones: the earlier passes'
        translations and the empty slots of the later passes. D's set feature is a sum over the
        slots, so these may follow the pass's slots instead of surrounding them."""
        return np.delete(self.translated[source], range(self.slots.start, self.slots.stop),
                         axis=1)


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
        self.directions = {s: self.direction_graph(s, t) for s, t in OTHER.items()}
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

    def mask_shape(self, slots):
        return self.image_shape[:1] + (slots,) + self.image_shape[2:]

    def direction_graph(self, source, target):
        """The translation source -> target of one pass, its reconstruction, the identity
        mapping of the source image, and their losses, averaged over the samples that have
        instances in the pass."""
        args = self.args
        image = nn.Variable(self.image_shape)
        masks = nn.Variable(self.mask_shape(self.ins_per))
        other_masks = nn.Variable(self.mask_shape(self.slots - self.ins_per))
        with nn.parameter_scope(f'generator_{source}2{target}'):
            fake, fake_masks, active = models.generator_pass(image, masks, args.ngf,
                                                             args.n_blocks)
        with nn.parameter_scope(f'generator_{target}2{source}'):
            rec, rec_masks = models.generator(fake, fake_masks, args.ngf, args.n_blocks)
            # A generator fed an image of its own output domain should change nothing.
            idt, idt_masks = models.generator(image, masks, args.ngf, args.n_blocks)
        with nn.parameter_scope('discriminator_' + target):
            scores = models.discriminator(fake, F.concatenate(fake_masks, other_masks, axis=1),
                                          args.ndf, args.n_layers_D, fix_parameters=True)
        losses = {
            'generator_loss': lsgan_loss(scores, 1.0, active),
            'reconstruction_loss': image_and_masks_l1(rec, rec_masks, image, masks, active,
                                                      args.ins_per),
            'identity_mapping_loss': image_and_masks_l1(idt, idt_masks, image, masks, active,
                                                        args.ins_per),
            'context_preserving_loss': context_preserving_loss(image, masks, fake, fake_masks,
                                                               active),
        }
        # The identity mapping does not depend on the translation: a graph of its own, run
        # before the other, so that their activations are never held at the same time.
        identity_loss = args.lambda_idt * losses['identity_mapping_loss']
        translation_loss = (losses['generator_loss']
                            + args.lambda_cyc * losses['reconstruction_loss']
                            + args.lambda_ctx * losses['context_preserving_loss'])
        keep_values(identity_loss, translation_loss, fake, fake_masks, rec, rec_masks,
                    *losses.values())
        return PassGraph(image, masks, other_masks, fake, fake_masks, rec, rec_masks, losses,
                         identity_loss, translation_loss)

    def discriminator_graph(self, domain):
        args = self.args
        real, fake = nn.Variable(self.image_shape), nn.Variable(self.image_shape)
        real_masks = nn.Variable(self.mask_shape(self.slots))
        fake_masks = nn.Variable(self.mask_shape(self.slots))
        fake_weights = nn.Variable(self.image_shape[:1])
        with nn.parameter_scope('discriminator_' + domain):
            real_scores = models.discriminator(real, real_masks, args.ndf, args.n_layers_D)
            fake_scores = models.discriminator(fake, fake_masks, args.ndf, args.n_layers_D)
        loss = discriminator_loss(real_scores, fake_scores, fake_weights)
        keep_values(loss)
        return DiscriminatorGraph(real, real_masks, fake, fake_masks, fake_weights, loss)

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
        images and masks). Returns the losses averaged over the passes that ran, the number of
        passes run (those with an instance in some sample of either domain), and for each
        domain translated, [(images, masks) of its batch, of the translation, of the
        reconstruction] after its last pass."""
        empty = np.full(self.mask_shape(self.slots - masks['x'].shape[1]), -1, np.float32)
        masks = {d: np.concatenate([m, empty], axis=1) for d, m in masks.items()}
        translated_images = dict(images)
        translated_masks = {d: np.full_like(m, -1) for d, m in masks.items()}
        losses, visuals, passes_run = defaultdict(list), {}, 0
        for p in range(self.passes):
            state = PassState(slice(p * self.ins_per, (p + 1) * self.ins_per), images, masks,
                              translated_images, translated_masks)
            if not state.sources:
                continue
            passes_run += 1
            self.update_generators(state, iteration)
            for source in state.sources:
                target, graph = OTHER[source], self.directions[source]
                state.translated[source][:, state.slots] = graph.fake_masks.d
                state.images[source] = graph.fake.d.copy()
                losses['discriminator_loss_' + target].append(self.update_discriminator(
                    target, state.real_images[target], state.real_masks[target],
                    state.images[source], state.translated[source], state.active[source],
                    iteration))
                for name, loss in graph.losses.items():
                    losses[f'{name}_{source}'].append(float(loss.d))
                rec_masks = np.full_like(state.real_masks[source], -1)
                rec_masks[:, state.slots] = graph.rec_masks.d
                visuals[source] = [(images[source], masks[source]),
                                   (state.images[source], state.translated[source].copy()),
                                   (graph.rec.d.copy(), rec_masks)]
        mean_losses = {name: float(np.mean(values)) for name, values in losses.items()}
        return mean_losses, passes_run, visuals

    def update_generators(self, state, iteration):
        """One Adam step of both generators on the losses of the pass's translations."""
        for scope in GENERATORS:
            self.solvers[scope].zero_grad()
        for source in state.sources:
            graph = self.directions[source]
            graph.image.d = state.images[source]
            graph.masks.d = state.real_masks[source][:, state.slots]
            graph.other_masks.d = state.masks_beside(source)
            for loss in [graph.identity_loss, graph.translation_loss]:
                loss.forward(clear_no_need_grad=True)
                loss.backward(clear_buffer=True)
            check_finite({f'{name}_{source}': loss for name, loss in graph.losses.items()},
                         iteration, self.args)
        for scope in GENERATORS:
            self.solvers[scope].update()

    def update_discriminator(self, domain, real_images, real_masks, fake_images, fake_masks,
                             active, iteration):
        """One Adam step of the discriminator of `domain` on its real batch, with every real
        instance in every pass as the official code, and on pooled fakes, weighted by
        `active`; returns its loss."""
        graph = self.discriminators[domain]
        graph.real.d, graph.real_masks.d = real_images, real_masks
        graph.fake.d, graph.fake_masks.d = self.pools[domain].query(fake_images, fake_masks,
                                                                    active)
        graph.fake_weights.d = active
        graph.loss.forward(clear_no_need_grad=True)
        check_finite({'discriminator_loss_' + domain: graph.loss}, iteration, self.args)
        solver = self.solvers['discriminator_' + domain]
        solver.zero_grad()
        graph.loss.backward(clear_buffer=True)
        solver.update()
        return float(graph.loss.d)


def cuda_installed():
    try:
        import nnabla_ext.cuda  # noqa: F401
        return True
    except ImportError:
        return False


def set_context(args):
    """Make the default context the one --context names (resolving its default). Returns what to
    apply, once, to the outputs of the graphs then built: on the CPU with --cpu-conv blas,
    cpu_functions.accelerate, which moves their convolutions and normalisations onto BLAS
    and C loops."""
    if args.context is None:
        args.context = 'cudnn' if cuda_installed() else 'cpu'
        logger.info('context: {} (from what is installed; choose with --context)'.format(
            args.context))
    elif args.context == 'cudnn' and not cuda_installed():
        raise ConfigError('--context cudnn needs nnabla-ext-cuda, which is not installed '
                          '(pip install -r requirements-cuda.txt)')
    nn.set_default_context(get_extension_context(args.context, device_id=args.device_id,
                                                 type_config=args.type_config))
    try:
        return graph_engine(args.context, args.cpu_conv)
    except cpu_functions.KernelsUnavailable as error:
        raise ConfigError(error) from None


def graph_engine(context, cpu_conv='blas'):
    """What to apply, once, to the outputs of graphs built for `context`: on the CPU with
    --cpu-conv blas, cpu_functions.accelerate; else nothing (NNabla's own kernels, as built).
    Compiles cpu_functions' C loops first if need be: a missing compiler stops here, before any
    work, with cpu_functions.KernelsUnavailable (an OSError)."""
    if context == 'cpu' and cpu_conv == 'blas':
        cpu_functions.kernels()
        return cpu_functions.accelerate
    return lambda *outputs: None


def check_sizes(args):
    for name in ['fineSizeH', 'fineSizeW']:
        if getattr(args, name) % 4:
            raise ConfigError(f'--{name} {getattr(args, name)} is not a multiple of 4, which '
                              'the generator needs')
        # Each stride-2 layer of the discriminator halves the size; its last two 4x4
        # convolutions take one pixel each.
        smallest = 3 * 2 ** args.n_layers_D
        if getattr(args, name) < smallest:
            raise ConfigError(f'--{name} {getattr(args, name)} is too small for --n-layers-D '
                              f'{args.n_layers_D} (at least {smallest})')
    if args.fineSizeH > args.loadSizeH or args.fineSizeW > args.loadSizeW:
        raise ConfigError(f'fine size {args.fineSizeH}x{args.fineSizeW} is larger than load '
                          f'size {args.loadSizeH}x{args.loadSizeW}')


def make_writable_folder(path):
    """Create the folder `path` if need be and make sure a file can be made in it, before any
    work; raises OSError otherwise."""
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


def check_writable(path):
    try:
        make_writable_folder(path)
    except OSError as error:
        raise ConfigError(f'{path} is not writable ({error.strerror})')


def make_loaders(args):
    """The slot count (--ins-max capped at the most instances any image has) and one
    independently shuffled iterator per domain: x reads trainA, y trainB."""
    if not os.path.isdir(args.dataroot):
        raise DataError(f'{args.dataroot}: dataset folder not found '
                        '(datasets/generate_ccp_dataset.py makes one)')
    ins_max = min(args.ins_max, count_max_instances(args.dataroot, 'train'))
    loaders = {domain: MaskedImageIterator(
        args.dataroot, 'train', letter, args.batch_size,
        load_size=(args.loadSizeH, args.loadSizeW), fine_size=(args.fineSizeH, args.fineSizeW),
        ins_max=ins_max, flip=not args.no_flip, set_order=args.set_order, seed=args.seed + i)
        for i, (domain, letter) in enumerate([('x', 'A'), ('y', 'B')])}
    return ins_max, loaders


def verify_dataset(loaders):
    """Decode every image and mask once, before anything is written, so that a corrupt file
    stops the run now and not epochs later; and refuse a domain without a single non-empty
    mask, which would train nothing."""
    def instances(image_path, mask_paths, size):
        _, masks, _ = load_resized(image_path, mask_paths, size)
        return int(np.sum(masks.max(axis=(1, 2)) > -1))

    workers = ThreadPoolExecutor(max_workers=2)
    try:
        for loader in loaders.values():
            folder = os.path.dirname(loader.image_paths[0])
            found = 0
            with tqdm(total=loader.size, desc=f'checking {folder}', leave=False,
                      dynamic_ncols=True) as progress:
                for count in workers.map(instances, loader.image_paths, loader.mask_paths,
                                         [loader.load_size] * loader.size):
                    found += count
                    progress.update()
            if not found:
                raise DataError(f'{folder}_seg: every mask is empty, so {folder} has no '
                                'instance to translate')
    finally:
        workers.shutdown(cancel_futures=True)


@contextmanager
def replaced_atomically(path):
    """Yields a temporary name beside `path` to write; it becomes `path` once the block ends,
    and is removed if the block fails, so that `path` is either the old file or the new one."""
    stem, extension = os.path.splitext(path)
    partial = stem + '.partial' + extension
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise


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
    """Write uint8 (H, W) or (H, W, 3) as `path`, atomically."""
    with replaced_atomically(path) as partial:
        Image.fromarray(array).save(partial)


def write_text(path, text):
    """Write `text` as `path`, atomically."""
    with replaced_atomically(path) as partial, open(partial, 'w') as f:
        f.write(text)


def save_tile(path, rows):
    """Write rows of (H, W, 3) panels in [0, 1] as one PNG."""
    tile = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
    write_png(path, (tile * 255).round().astype(np.uint8))


def save_translation_tiles(visuals, monitor_path, epoch):
    """Source, translation and reconstruction of each direction: images on top, masks below."""
    for source, target in OTHER.items():
        if source in visuals:
            save_tile(os.path.join(monitor_path, f'translation_{source}2{target}_epoch_'
                                                 f'{epoch:04d}.png'),
                      [[image_panel(image) for image, _ in visuals[source]],
                       [mask_panel(masks) for _, masks in visuals[source]]])


def plot_losses(monitor_path):
    """Redraw monitor_path/losses.png from the monitor's series files."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, len(LOSS_NAMES), figsize=(4 * len(LOSS_NAMES), 3.2))
    try:
        for axis, name in zip(axes, LOSS_NAMES):
            for domain in 'xy':
                path = os.path.join(monitor_path, f'{name}_{domain}.series.txt')
                if os.path.exists(path) and os.path.getsize(path):
                    series = np.loadtxt(path, ndmin=2)
                    axis.plot(series[:, 0], series[:, 1], label=domain)
            axis.set_title(name.replace('_', ' '))
            axis.set_xlabel('iteration')
            if axis.lines:
                axis.legend()
        figure.tight_layout()
        with replaced_atomically(os.path.join(monitor_path, 'losses.png')) as partial:
            figure.savefig(partial, dpi=80)
    finally:
        plt.close(figure)
        # A figure is a web of reference cycles: left to the collector's own schedule, a few
        # dozen accumulate (tens of MB) before they are freed.
        gc.collect()


def save_pictures(visuals, monitor_path, epoch):
    """The epoch's tiles and losses.png. They are for looking at: failing to write them (a
    full disk, say) is a warning, and training goes on."""
    try:
        save_translation_tiles(visuals, monitor_path, epoch)
        plot_losses(monitor_path)
    except Exception as error:
        logger.warning(f'epoch {epoch}: pictures not written ({type(error).__name__}: {error})')


class MonitorSeriesFile:
    """A series in nnabla.monitor's file format: NAME.series.txt, one line `iteration value`
    per `interval` iterations (when iteration + 1 is a multiple of it), the value the mean of
    those added since the line before. Unlike nnabla's MonitorSeries it does not empty the file
    when created (a fresh run starts without one), and a resumed run continues it through
    load_state_dict."""

    def __init__(self, folder, name, interval):
        self.path = os.path.join(folder, name + '.series.txt')
        self.interval = interval
        self.pending = []  # the values added since the last line
        self.next_iteration = 0

    def add(self, iteration, value):
        self.pending.append(value)
        self.next_iteration = iteration + 1
        if self.next_iteration % self.interval == 0:
            with open(self.path, 'a') as f:
                f.write(f'{iteration} {np.mean(self.pending):g}\n')
            self.pending = []

    def state_dict(self):
        return {'next_iteration': self.next_iteration, 'pending': list(self.pending)}

    def load_state_dict(self, state):
        """Continue as at the checkpoint: take up its unfinished mean, and drop the file's
        lines from its next iteration on, written after it by iterations now being redone."""
        self.next_iteration, self.pending = int(state['next_iteration']), list(state['pending'])
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if re.match(r'\d+ ', line)
                    and int(line.split()[0]) < self.next_iteration]
        with replaced_atomically(self.path) as partial, open(partial, 'w') as f:
            f.writelines(kept)


class TrainingState:
    """What a checkpoint holds beside parameters and solver states, so that a resumed run goes
    on exactly as an uninterrupted one: the image pools with their random states, each
    loader's order, position and random state, and the unfinished means of the series."""

    def __init__(self, trainer, loaders, series):
        self.trainer, self.loaders, self.series = trainer, loaders, series

    def state_dict(self):
        return {'pools': {d: pool.state_dict() for d, pool in self.trainer.pools.items()},
                'loaders': {d: loader.get_state() for d, loader in self.loaders.items()},
                'series': {name: s.state_dict() for name, s in self.series.items()}}

    def load_state_dict(self, state):
        for d, pool in self.trainer.pools.items():
            pool.load_state_dict(state['pools'][d], self.trainer.image_shape[1:],
                                 self.trainer.mask_shape(self.trainer.slots)[1:])
        for d, loader in self.loaders.items():
            loader.set_state(state['loaders'][d])
        for name, series in self.series.items():  # last: this rewrites files
            series.load_state_dict(state['series'][name])


def shown(value):
    """A flag's value as a message shows it: on/off for switches."""
    return ('on' if value else 'off') if isinstance(value, bool) else value


def changed_flags(names, saved_args, args):
    """[(name, value in the checkpoint, value now)] of the flags in `names` that changed."""
    def differ(name, old, new):
        if name == 'dataroot':
            return os.path.abspath(old) != os.path.abspath(new)
        return old != new

    return [(name, saved_args[name], getattr(args, name)) for name in names
            if name in saved_args and differ(name, saved_args[name], getattr(args, name))]


def refuse_fixed_changes(path, saved, args, loaders):
    """Refuse, in one line, flags of FIXED_ON_RESUME given other values than the checkpoint
    `path` (state.json `saved`) was made with, and a dataset that changed size since."""
    refused = changed_flags(FIXED_ON_RESUME, saved['args'], args)
    if refused:
        listed = '; '.join(f'{FLAGS[name]} {shown(old)}, not {shown(new)}'
                           for name, old, new in refused)
        raise ConfigError(f'{path} was made with {listed} (these flags decide the data, the '
                          'shapes or the saved state and cannot change on resume)')
    for d, loader in loaders.items():
        if saved['images_per_domain'].get(d) != loader.size:
            raise ConfigError(
                f'{path} was trained on {saved["images_per_domain"].get(d)} images in '
                f'{os.path.dirname(loader.image_paths[0])}, which now holds {loader.size}: '
                'the dataset changed')


def load_checkpoint(path, args, trainer, training_state, loaders):
    """Restore the checkpoint `path` into the trainer and the training state and return its
    state.json. Raises DamagedCheckpoint naming a missing or unreadable file, ConfigError
    for settings that cannot change."""
    state = read_checkpoint(path, keys=['args', 'images_per_domain', 'training_state'])
    if not isinstance(state['args'], dict) or not isinstance(state['images_per_domain'], dict):
        raise DamagedCheckpoint(f'{path}/state.json is unreadable (args or images_per_domain '
                                'is not a dict)')
    refuse_fixed_changes(path, state, args, loaders)
    load_parameters_and_solvers(path, trainer.solvers)
    try:
        training_state.load_state_dict(state['training_state'])
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise DamagedCheckpoint(f'{path}/state.json and training_state.npz do not hold a '
                                f'training state of this run ({type(error).__name__}: {error})')
    return state


def resume(args, trainer, training_state, loaders):
    """Restore the newest intact checkpoint and return its iteration. Newer damaged ones are
    skipped with a line naming the file, then renamed NAME.damaged: the iterations after the
    one resumed are redone, and a damaged folder must not pass for the newest checkpoint."""
    folders = checkpoint_folders(args.model_save_path)
    if not folders:
        raise ConfigError(f'--resume: no checkpoint in {args.model_save_path}')
    skipped = []
    for path in reversed(folders):
        try:
            state = load_checkpoint(path, args, trainer, training_state, loaders)
        except DamagedCheckpoint as error:
            logger.warning(f'--resume: skipped {os.path.basename(path)}: {error}')
            skipped.append(path)
            continue
        for damaged in skipped:
            shutil.rmtree(damaged + '.damaged', ignore_errors=True)
            os.rename(damaged, damaged + '.damaged')
            logger.info(f'--resume: renamed {damaged} to {damaged}.damaged')
        logger.info(f'resumed from {path} at iteration {state["iteration"]}')
        for name, old, new in changed_flags(CHANGEABLE_ON_RESUME, state['args'], args):
            logger.info(f'--resume: {FLAGS[name]} {shown(new)} (the checkpoint has {shown(old)})')
        return state['iteration']
    raise ConfigError(f'--resume: no intact checkpoint in {args.model_save_path} (skipped '
                      f'{len(skipped)}, see the warnings above)')


def remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def claim_folders(args, folders):
    """With the folders locked: remove what a killed run left half-written; then, unless
    resuming, refuse folders that hold another run, or delete its files with --overwrite."""
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            if RUN_FILE.fullmatch(name) and '.partial' in name:
                remove(os.path.join(folder, name))
                logger.info(f'removed {os.path.join(folder, name)}, left by a killed run')
    if args.resume:
        return
    for folder in folders:
        found = sorted(name for name in os.listdir(folder) if RUN_FILE.fullmatch(name))
        if found and not args.overwrite:
            listed = ', '.join(found[:2]) + (', ...' if len(found) > 2 else '')
            raise ConfigError(f'{folder} holds another run ({listed}): continue it with '
                              '--resume, or delete its files with --overwrite')
        for name in found:
            remove(os.path.join(folder, name))
        if found:
            logger.info(f'--overwrite: deleted the {len(found)} files and folders of the '
                        f'earlier run in {folder}')


class Interrupts:
    """SIGINT and SIGTERM for the whole run. During training, the first asks the loop to
    checkpoint and stop after the current iteration. At any other moment, and for a second
    one, the process ends at once with one line, after releasing its folder locks: a
    KeyboardInterrupt could land inside one of nnabla's calls into Python (cpu_functions),
    which turns it into a SystemError."""

    def __init__(self):
        self.training = False
        self.received = None  # the name of the first signal during training
        self.locks = []
        # A signal a shell set to be ignored (a background job's SIGINT) stays ignored.
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)
                         if signal.getsignal(s) is not signal.SIG_IGN}

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.training and self.received is None:
            self.received = name
            logger.info(f'{name}: stopping after this iteration')
            return
        for lock in self.locks:
            lock.release()
        outcome = ('at once; the checkpoints written so far are kept (continue with --resume)'
                   if self.received or self.training else 'before training started')
        os.write(2, f'\ntrain.py: {name}: stopped {outcome}\n'.encode())
        os._exit(1)

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def train(args):
    check_sizes(args)
    accelerate = set_context(args)
    nn.clear_parameters()
    nn.seed(args.seed)  # parameter initialisers draw from nnabla's own generator
    interrupts = Interrupts()
    with ExitStack() as cleanup:
        cleanup.callback(interrupts.restore)
        ins_max, loaders = make_loaders(args)
        for loader in loaders.values():
            cleanup.callback(loader.close)
        verify_dataset(loaders)
        folders = list({os.path.realpath(path): path
                        for path in [args.model_save_path, args.monitor_path]}.values())
        for folder in folders:
            check_writable(folder)
            interrupts.locks.append(cleanup.enter_context(FolderLock(folder)))
        claim_folders(args, folders)

        images_per_domain = {d: loader.size for d, loader in loaders.items()}
        iterations_per_epoch = math.ceil(max(images_per_domain.values()) / args.batch_size)
        last_iteration = args.max_epoch * iterations_per_epoch
        trainer = Trainer(args, ins_max)
        accelerate(*trainer.graph_outputs())
        logger.info(f'instance slots per image: {ins_max}, translated in {trainer.passes} '
                    f'pass(es) of {trainer.ins_per}')
        series = {name: MonitorSeriesFile(args.monitor_path, name, args.log_step)
                  for name in SERIES + [TIME_SERIES]}
        training_state = TrainingState(trainer, loaders, series)
        iteration = resume(args, trainer, training_state, loaders) if args.resume else 0
        if iteration >= last_iteration:
            raise ConfigError(f'--resume: the checkpoint is at iteration {iteration} (epoch '
                              f'{iteration // iterations_per_epoch}), where --max-epoch '
                              f'{args.max_epoch} has ended: nothing to train; give a larger '
                              '--max-epoch')

        def checkpoint():
            state = {'epoch': iteration // iterations_per_epoch, 'args': vars(args),
                     'images_per_domain': images_per_domain,
                     'learning_rates': {k: s.learning_rate() for k, s in trainer.solvers.items()},
                     'training_state': training_state.state_dict()}
            try:
                return save_checkpoint(args.model_save_path, iteration, state, trainer.solvers,
                                       args.keep_checkpoints)
            except OSError as error:
                raise TrainingStopped(f'could not write the checkpoint of iteration {iteration} '
                                      f'in {args.model_save_path} ({error}); the earlier ones '
                                      'are intact')

        visuals = {}
        interrupts.training = True
        started = time.perf_counter()
        while iteration < last_iteration:
            epoch = iteration // iterations_per_epoch
            trainer.set_epoch(epoch)
            # A context, so that the bar is gone before an error message is printed.
            with tqdm(initial=iteration % iterations_per_epoch, total=iterations_per_epoch,
                      desc=f'epoch {epoch + 1}/{args.max_epoch}', leave=False,
                      dynamic_ncols=True) as progress:
                while iteration < (epoch + 1) * iterations_per_epoch:
                    losses, _, step_visuals = trainer.step(*next_batches(loaders), iteration)
                    visuals.update(step_visuals)
                    for name, value in losses.items():
                        series[name].add(iteration, value)
                    finished = time.perf_counter()
                    series[TIME_SERIES].add(iteration, finished - started)
                    started = finished
                    iteration += 1
                    progress.update()
                    progress.set_postfix({name: f'{losses[name]:.3g}' for name in
                                          ['generator_loss_x', 'discriminator_loss_y']
                                          if name in losses})
                    if interrupts.received:
                        raise TrainingStopped(f'{interrupts.received} at iteration {iteration}: '
                                              f'saved {checkpoint()}; continue with --resume')
            if (epoch + 1) % args.save_interval == 0 or epoch + 1 == args.max_epoch:
                logger.info(f'epoch {epoch + 1}: saved {checkpoint()}')
            save_pictures(visuals, args.monitor_path, epoch + 1)


def main(argv=None):
    args = get_args(argv)
    try:
        train(args)
    except (ConfigError, DataError, FolderInUse, TrainingStopped) as error:
        sys.exit(f'train.py: {error}')


if __name__ == '__main__':
    main()
