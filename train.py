"""Train InstaGAN on two unaligned domains of images with instance masks (x = A, y = B).

    python train.py --dataroot datasets/jeans2skirt_ccp

Every iteration takes a batch of each domain and runs the passes of sequential mini-batch
translation (paper section 2.3): pass i translates instance slots [i K, (i+1) K) on top of
the image translated by the earlier passes. Each pass updates both generators on the
adversarial, cycle, identity and context-preserving losses, then the discriminator of each
domain it translated into (that of y where some x of the batch has an instance in the pass's
slots, and the other way round) on real images and on fakes drawn from a pool of past
translations. Graphs are built once.

The method comes first (Trainer, its graphs, ImagePool, the schedule); the loop at the end
leaves folders, checkpoints and monitors to runtime/.
"""
from runtime.signals import exit_at_once, handle_stop_signals

if __name__ == '__main__':  # until the run takes them over: nnabla's imports take a while
    handle_stop_signals(exit_at_once)

import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import nnabla as nn
import nnabla.functions as F
import nnabla.solvers as S
import numpy as np
from nnabla.logger import logger

import models
from args import CHANGEABLE_ON_RESUME, FIXED_ON_RESUME, get_args
from data import Loaders, check_not_in_dataset
from losses import (
    LOSS_NAMES,
    context_preserving_loss,
    discriminator_loss,
    image_and_masks_l1,
    lsgan_loss,
)
from runtime import RunError
from runtime.checkpoints import checkpoint_paths, resume, save_checkpoint
from runtime.device import check_memory, set_context
from runtime.files import WriteFailed
from runtime.monitors import (
    Monitors,
    Progress,
    image_panel,
    mask_panel,
    save_pictures,
    write_arguments,
)
from runtime.run import Run, run_files
from runtime.signals import exit_status

SERIES = [f'{name}_{d}' for name in LOSS_NAMES for d in 'xy']
GENERATORS = ['generator_x2y', 'generator_y2x']
OTHER = {'x': 'y', 'y': 'x'}


class Trainer:
    """The graphs, solvers and image pools of InstaGAN, and one training iteration.

    Pass graphs are built once for K = --ins-per slots and serve every pass. With M = --ins-max
    slots (rounded up to a multiple of K), the discriminators see an image with all M slots:
    those translated so far, the current pass's, and empty ones for the passes to come.
    """

    def __init__(self, args, ins_max):
        self.args = args
        self.ins_per = models.slots_per_pass(args.ins_per, ins_max)
        self.passes = models.pass_slices(ins_max, self.ins_per)
        self.slots = self.passes[-1].stop
        # The official code carries --ins-per slots per pass, empty ones included, so its
        # cycle and identity L1 average over 3 + --ins-per channels even where fewer are built.
        self.l1_mask_channels = args.ins_per
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
                                                      self.l1_mask_channels),
            'identity_mapping_loss': image_and_masks_l1(idt, idt_masks, image, masks, active,
                                                        self.l1_mask_channels),
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
        for slots in self.passes:
            state = PassState(slots, images, masks, translated_images, translated_masks)
            if not state.sources:
                continue
            passes_run += 1
            self.update_generators(state, iteration)
            # Only the discriminator of a domain translated into in this pass has new fakes.
            for source in state.sources:
                target, graph = OTHER[source], self.directions[source]
                state.translated[source][:, slots] = graph.fake_masks.d
                state.images[source] = graph.fake.d.copy()
                losses['discriminator_loss_' + target].append(self.update_discriminator(
                    target, state.real_images[target], state.real_masks[target],
                    state.images[source], state.translated[source], state.active[source],
                    iteration))
                for name, loss in graph.losses.items():
                    losses[f'{name}_{source}'].append(float(loss.d))
                rec_masks = np.full_like(state.real_masks[source], -1)
                rec_masks[:, slots] = graph.rec_masks.d
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
                         iteration, self.args.nan_policy)
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
        check_finite({'discriminator_loss_' + domain: graph.loss}, iteration,
                     self.args.nan_policy)
        solver = self.solvers['discriminator_' + domain]
        solver.zero_grad()
        graph.loss.backward(clear_buffer=True)
        solver.update()
        return float(graph.loss.d)

    def set_epoch(self, epoch):
        for scope, solver in self.solvers.items():
            solver.set_learning_rate(learning_rate(
                self.base_rates[scope], epoch, self.args.lr_decay_start_epoch,
                self.args.max_epoch))

    def graph_outputs(self):
        """The variables whose graphs hold every function the iteration runs."""
        return [loss for graph in self.directions.values()
                for loss in (graph.identity_loss, graph.translation_loss)] + \
            [graph.loss for graph in self.discriminators.values()]

    def state_dict(self):
        return {d: pool.state_dict() for d, pool in self.pools.items()}

    def load_state_dict(self, state):
        for d, pool in self.pools.items():
            pool.load_state_dict(state[d], self.image_shape[1:],
                                 self.mask_shape(self.slots)[1:])


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
        if not isinstance(images, np.ndarray) or not isinstance(masks, np.ndarray) or not (
                images.dtype.kind == masks.dtype.kind == 'f') or not (
                len(images) == len(masks) <= self.size) or len(images) and (
                images.shape[1:] != image_shape or masks.shape[1:] != mask_shape):
            raise ValueError(f'a pool of {np.shape(images)} images of {np.asarray(images).dtype} '
                             f'and {np.shape(masks)} masks does not fit a pool of {self.size} '
                             f'{image_shape} and {mask_shape}')
        self.images, self.masks = list(images), list(masks)
        self.rng.set_state(tuple(state['rng']))


def learning_rate(base, epoch, decay_start, max_epoch):
    """The official schedule for epoch 0, 1, ...: constant for `decay_start` epochs, then
    linear decay, base * (1 - (epoch + 1 - decay_start) / (max_epoch - decay_start + 1))."""
    decay_epochs = max_epoch - decay_start
    return base * (1.0 - max(0, epoch + 1 - decay_start) / float(decay_epochs + 1))


def check_finite(losses, iteration, nan_policy):
    for name, loss in losses.items():
        value = float(loss.d)
        if not math.isfinite(value):
            message = f'{name} is {value} at iteration {iteration}'
            if nan_policy == 'stop':
                raise RunError(message + '; stopped before updating with it')
            logger.warning(message)


def keep_values(*variables):
    """The step reads these after forward(clear_no_need_grad=True) and
    backward(clear_buffer=True), which free every buffer not marked persistent."""
    for variable in variables:
        variable.persistent = True


class TrainingState:
    """What a checkpoint holds beside parameters and solver states, so that a resumed run goes
    on exactly as an uninterrupted one."""

    def __init__(self, **parts):
        self.parts = parts

    def state_dict(self):
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state):
        for name, part in self.parts.items():  # monitors last: they rewrite files
            part.load_state_dict(state[name])


class Stopped(RunError):
    """A stop signal ended the run after a checkpoint."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.status = exit_status(signum)


def train(args):
    # A run's files in a dataset's folders would be read as its images or masks.
    check_not_in_dataset(args.model_save_path, '--model-save-path')
    check_not_in_dataset(args.monitor_path, '--monitor-path')
    args.context, accelerate = set_context(args.context, args.device_id, args.type_config,
                                           args.cpu_conv)
    nn.clear_parameters()
    nn.seed(args.seed)  # parameter initialisers draw from nnabla's own generator
    loaders = Loaders(args.dataroot, args.batch_size, (args.loadSizeH, args.loadSizeW),
                      (args.fineSizeH, args.fineSizeW), args.ins_max, not args.no_flip,
                      args.set_order, args.seed)
    with loaders:
        # On a GPU the networks are in its memory, which is not checked here.
        networks = models.training_memory(
            args.batch_size, (args.fineSizeH, args.fineSizeW), args.ins_per, loaders.ins_max,
            args.ngf, args.ndf, args.n_blocks, args.n_layers_D,
            args.pool_size) if args.context == 'cpu' else 0
        check_memory(networks + loaders.memory(),
                     f'--batch-size {args.batch_size} of {args.fineSizeH}x{args.fineSizeW} (load '
                     f'size {args.loadSizeH}x{args.loadSizeW}) with --ngf {args.ngf} --ndf '
                     f'{args.ndf} --n-blocks {args.n_blocks} and {loaders.ins_max} instance '
                     f'slot{"s" * (loaders.ins_max > 1)}',
                     'make some of these smaller')
        for loader in loaders.domains.values():
            if args.batch_size > loader.size:  # the iterator starts its next pass in the batch
                logger.warning(f'--batch-size {args.batch_size} is larger than the {loader.size} '
                               f'images of {loader.folder}: each of its batches repeats images')
        loaders.verify()
        folders = {'--model-save-path': args.model_save_path, '--monitor-path': args.monitor_path}
        with Run(folders, args.monitor_path, run_files(SERIES), args.resume,
                 args.overwrite) as run:
            trainer = Trainer(args, loaders.ins_max)
            accelerate(*trainer.graph_outputs())
            logger.info(f'instance slots per image: {loaders.ins_max}, translated in '
                        f'{len(trainer.passes)} pass(es) of {trainer.ins_per}')
            monitors = Monitors(args.monitor_path, SERIES, args.log_step)
            state = TrainingState(pools=trainer, loaders=loaders, monitors=monitors)
            iteration = 0
            if args.resume:
                iteration = resume(
                    args, trainer.solvers, state, loaders.identity(), FIXED_ON_RESUME,
                    CHANGEABLE_ON_RESUME, models.current_parameter_name,
                    check=lambda path, saved: run.continue_run(path, saved.get('run')))['iteration']
            write_arguments(args.monitor_path, args)
            train_epochs(args, trainer, loaders, monitors, state, run, iteration)


def train_epochs(args, trainer, loaders, monitors, state, run, iteration):
    """From `iteration` to the end of --max-epoch, with a checkpoint every --save-interval
    epochs and when a stop signal asks for one."""
    per_epoch = math.ceil(max(loaders.sizes.values()) / args.batch_size)
    if iteration >= args.max_epoch * per_epoch:
        raise RunError(f'--resume: the checkpoint is at iteration {iteration} (epoch '
                       f'{iteration // per_epoch}), where --max-epoch {args.max_epoch} has '
                       'ended: nothing to train; give a larger --max-epoch')

    def checkpoint():
        saved = {'epoch': iteration // per_epoch, 'run': run.id, 'args': vars(args),
                 'dataset': loaders.identity(),
                 'learning_rates': {k: s.learning_rate() for k, s in trainer.solvers.items()},
                 'training_state': state.state_dict()}
        try:
            return save_checkpoint(args.model_save_path, iteration, saved, trainer.solvers,
                                   args.keep_checkpoints)
        except WriteFailed as error:
            raise RunError(f'could not write the checkpoint of iteration {iteration} in '
                           f'{args.model_save_path} ({error.reason}); the earlier ones are '
                           'intact') from None

    run.stop.deferring = True
    run.stop.at_once = '; the checkpoints written so far are kept (continue with --resume)'
    visuals = {}
    for epoch in range(iteration // per_epoch, args.max_epoch):
        trainer.set_epoch(epoch)
        monitors.timer.start()  # the timer counts iterations, not checkpoints and pictures
        with Progress(per_epoch, iteration % per_epoch,
                      f'epoch {epoch + 1}/{args.max_epoch}') as progress:
            while iteration < (epoch + 1) * per_epoch:
                losses, _, step_visuals = trainer.step(*loaders.next_batches(), iteration)
                visuals.update(step_visuals)
                try:
                    monitors.add(iteration, losses)
                except WriteFailed as error:
                    # The files now lag the monitors' state: no checkpoint may hold it.
                    raise RunError(f'{error}; stopped at iteration {iteration}'
                                   f'{last_checkpoint(args.model_save_path)}') from None
                iteration += 1
                progress.update(losses)
                if run.stop.received:
                    raise Stopped(f'{run.stop.name} at iteration {iteration}: saved '
                                  f'{checkpoint()}; continue with --resume', run.stop.received)
        if (epoch + 1) % args.save_interval == 0 or epoch + 1 == args.max_epoch:
            logger.info(f'epoch {epoch + 1}: saved {checkpoint()}')
        tiles = {f'translation_{s}2{OTHER[s]}': [[image_panel(i) for i, _ in rows],
                                                [mask_panel(m) for _, m in rows]]
                 for s, rows in visuals.items()}
        save_pictures(args.monitor_path, epoch + 1, tiles, LOSS_NAMES)


def last_checkpoint(model_path):
    """What a run stopped by a failed write can continue from, as the end of its message."""
    paths = checkpoint_paths(model_path)
    if not paths:
        return ', before its first checkpoint'
    return f'; {paths[-1]} is intact: continue from it with --resume'


def main(argv=None):
    args = get_args(argv)
    try:
        train(args)
    except Stopped as error:
        print(f'train.py: {error}', file=sys.stderr)
        sys.exit(error.status)
    except RunError as error:
        sys.exit(f'train.py: {error}')


if __name__ == '__main__':
    main()
