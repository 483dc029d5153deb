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
from losses import LOSS_NAMES, context_preserving_loss, discriminator_loss, image_and_masks_l1, lsgan_loss
from runtime import RunError
from runtime.checkpoints import Checkpoints
from runtime.device import check_training_memory, set_context
from runtime.distributed import Processes, start_processes
from runtime.monitors import Monitors, Progress
from runtime.run import Run, run_files

SERIES = [f'{name}_{d}' for name in LOSS_NAMES for d in 'xy']
GENERATORS = ['generator_x2y', 'generator_y2x']
OTHER = {'x': 'y', 'y': 'x'}


class Trainer:
    """The graphs, solvers and image pools of InstaGAN, and one training iteration.

    Pass graphs are built once for K = --ins-per slots and serve every pass. With M = --ins-max
    slots (rounded up to a multiple of K), the discriminators see an image with all M slots:
    those translated so far, the current pass's, and empty ones for the passes to come.

    Under data parallelism (runtime.distributed) every rank runs the passes that some rank has
    instances for, and each solver steps on the gradients' mean over the ranks.
    """

    def __init__(self, args, ins_max, processes=None):
        self.args, self.processes = args, processes or Processes()
        self.ins_per = models.slots_per_pass(args.ins_per, ins_max)
        self.passes = models.pass_slices(ins_max, self.ins_per)
        self.slots = self.passes[-1].stop
        # The official code carries --ins-per slots per pass, empty ones included, so its
        # cycle and identity L1 average over 3 + --ins-per channels even where fewer are built.
        self.l1_mask_channels = args.ins_per
        self.image_shape = (args.batch_size, 3, args.fineSizeH, args.fineSizeW)
        self.directions = {s: self.direction_graph(s, t) for s, t in OTHER.items()}
        self.discriminators = {d: self.discriminator_graph(d) for d in 'xy'}
        self.base_rates = {scope: args.learning_rate_G for scope in GENERATORS}
        self.base_rates.update({f'discriminator_{d}': args.learning_rate_D for d in 'xy'})
        self.solvers = {s: S.Adam(rate, args.beta1, args.beta2) for s, rate in self.base_rates.items()}
        for scope, solver in self.solvers.items():
            with nn.parameter_scope(scope):
                solver.set_parameters(nn.get_parameters())
        self.pools = {d: ImagePool(args.pool_size, args.seed + 10 + i) for i, d in enumerate('xy')}
        logger.info(f'instance slots per image: {ins_max}, in {len(self.passes)} pass(es) of {self.ins_per}')

    def mask_shape(self, slots):
        return self.image_shape[:1] + (slots,) + self.image_shape[2:]

    def direction_graph(self, source, target):
        """The translation source -> target of one pass, its reconstruction, the identity
        mapping of the source image, and their losses, averaged over the samples that have
        instances in the pass."""
        args = self.args
        image = nn.Variable(self.image_shape)
        masks = nn.Variable(self.mask_shape(self.ins_per))
        beside = nn.Variable(self.mask_shape(self.slots - self.ins_per))
        with nn.parameter_scope(f'generator_{source}2{target}'):
            fake, fake_masks, active = models.generator_pass(image, masks, args.ngf, args.n_blocks)
        with nn.parameter_scope(f'generator_{target}2{source}'):
            rec, rec_masks = models.generator(fake, fake_masks, args.ngf, args.n_blocks)
            # A generator fed an image of its own output domain should change nothing.
            idt, idt_masks = models.generator(image, masks, args.ngf, args.n_blocks)
        with nn.parameter_scope('discriminator_' + target):
            all_masks = F.concatenate(fake_masks, beside, axis=1)
            scores = models.discriminator(fake, all_masks, args.ndf, args.n_layers_D, fix_parameters=True)

        def l1_to_source(out, out_masks):
            return image_and_masks_l1(out, out_masks, image, masks, active, self.l1_mask_channels)

        losses = {
            'generator_loss': lsgan_loss(scores, 1.0, active),
            'reconstruction_loss': l1_to_source(rec, rec_masks),
            'identity_mapping_loss': l1_to_source(idt, idt_masks),
            'context_preserving_loss': context_preserving_loss(image, masks, fake, fake_masks, active),
        }
        # The identity mapping does not depend on the translation: a graph of its own, run
        # before the other, so that their activations are never held at the same time.
        identity_loss = args.lambda_idt * losses['identity_mapping_loss']
        translation_loss = (
            losses['generator_loss']
            + args.lambda_cyc * losses['reconstruction_loss']
            + args.lambda_ctx * losses['context_preserving_loss']
        )
        keep_values(identity_loss, translation_loss, fake, fake_masks, rec, rec_masks, *losses.values())
        return PassGraph(
            image, masks, beside, fake, fake_masks, rec, rec_masks, losses, identity_loss, translation_loss
        )

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
        anywhere = (
            self.processes.sum([[np.any(masks[d][:, slots] > -1) for d in 'xy'] for slots in self.passes]) > 0
        )
        for slots, translated_anywhere in zip(self.passes, anywhere):
            sources = [d for d, on in zip('xy', translated_anywhere) if on]
            state = PassState(slots, images, masks, translated_images, translated_masks, sources)
            if not state.sources:
                continue
            passes_run += 1
            self.update_generators(state, iteration)
            # Only the discriminator of a domain translated into in this pass has new fakes.
            for source in state.sources:
                target, graph = OTHER[source], self.directions[source]
                state.translated[source][:, slots] = graph.fake_masks.d
                state.images[source] = graph.fake.d.copy()
                losses['discriminator_loss_' + target].append(
                    self.update_discriminator(state, source, iteration)
                )
                for name, loss in graph.losses.items():
                    losses[f'{name}_{source}'].append(float(loss.d))
                rec_masks = np.full_like(state.real_masks[source], -1)
                rec_masks[:, slots] = graph.rec_masks.d
                visuals[source] = [
                    (images[source], masks[source]),
                    (state.images[source], state.translated[source].copy()),
                    (graph.rec.d.copy(), rec_masks),
                ]
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
            graph.beside.d = state.masks_beside(source)
            for loss in [graph.identity_loss, graph.translation_loss]:
                loss.forward(clear_no_need_grad=True)
                loss.backward(clear_buffer=True)
        losses = {f'{name}_{s}': v for s in state.sources for name, v in self.directions[s].losses.items()}
        self.check_finite(losses, iteration)
        for scope in GENERATORS:
            self.processes.mean_gradients(self.solvers[scope])
            self.solvers[scope].update()

    def update_discriminator(self, state, source, iteration):
        """One Adam step of the discriminator of the target domain of `source` on its real batch,
        with every real instance in every pass as the official code, and on pooled fakes of the
        pass's translations, weighted by whether a sample had an instance translated; returns
        its loss."""
        domain = OTHER[source]
        graph, active = self.discriminators[domain], state.active[source]
        graph.real.d, graph.real_masks.d = state.real_images[domain], state.real_masks[domain]
        graph.fake.d, graph.fake_masks.d = self.pools[domain].query(
            state.images[source], state.translated[source], active
        )
        graph.fake_weights.d = active
        graph.loss.forward(clear_no_need_grad=True)
        self.check_finite({'discriminator_loss_' + domain: graph.loss}, iteration)
        solver = self.solvers['discriminator_' + domain]
        solver.zero_grad()
        graph.loss.backward(clear_buffer=True)
        self.processes.mean_gradients(solver)
        solver.update()
        return float(graph.loss.d)

    def check_finite(self, losses, iteration):
        """Stop (or warn, --nan-policy warn) before an update on a NaN or infinite loss, on every
        rank alike."""
        bad = [(name, float(loss.d)) for name, loss in losses.items() if not math.isfinite(float(loss.d))]
        if not self.processes.any(bad):
            return
        what = f'{bad[0][0]} is {bad[0][1]}' if bad else 'a loss of another rank is not finite'
        if self.args.nan_policy == 'stop':
            raise RunError(f'{what} at iteration {iteration}; stopped before updating with it')
        logger.warning(f'{what} at iteration {iteration}')

    def set_epoch(self, epoch):
        decay_start, max_epoch = self.args.lr_decay_start_epoch, self.args.max_epoch
        for scope, solver in self.solvers.items():
            solver.set_learning_rate(learning_rate(self.base_rates[scope], epoch, decay_start, max_epoch))

    def graph_outputs(self):
        """The variables whose graphs hold every function the iteration runs."""
        losses = [[graph.identity_loss, graph.translation_loss] for graph in self.directions.values()]
        return sum(losses, []) + [graph.loss for graph in self.discriminators.values()]

    def state_dict(self):
        return {d: pool.state_dict() for d, pool in self.pools.items()}

    def load_state_dict(self, state):
        for d, pool in self.pools.items():
            pool.load_state_dict(state[d], self.image_shape[1:], self.mask_shape(self.slots)[1:])


@dataclass
class PassGraph:
    """Generator side of one pass of source -> target, for K = --ins-per slots of M."""

    image: nn.Variable  # the source images as translated by the earlier passes
    masks: nn.Variable  # the pass's K source masks
    beside: nn.Variable  # the M - K masks D sees beside the pass's translated ones
    fake: nn.Variable
    fake_masks: nn.Variable
    rec: nn.Variable  # the reconstruction target -> source of the translation
    rec_masks: nn.Variable
    losses: dict  # the generator-side terms of LOSS_NAMES, unweighted
    identity_loss: nn.Variable  # weighted; see Trainer.direction_graph
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

    slots: slice  # the instance slots the pass translates
    real_images: dict  # the batch
    real_masks: dict  # its masks, all M slots
    images: dict  # the images as translated by the earlier passes; the pass replaces them
    translated: dict  # the masks translated so far, -1 (empty) elsewhere; the pass fills `slots`
    sources: list  # the domains translated: those with an instance in some sample of a rank
    active: dict = field(init=False)  # (B,) bool: the samples with an instance in `slots`

    def __post_init__(self):
        self.active = {d: np.any(m[:, self.slots] > -1, axis=(1, 2, 3)) for d, m in self.real_masks.items()}

    def masks_beside(self, source):
        """The masks D sees beside the pass's own translated ones: the earlier passes'
        translations and the empty slots of the later passes. D's set feature is a sum over the
        slots, so these may follow the pass's slots instead of surrounding them."""
        return np.delete(self.translated[source], range(self.slots.start, self.slots.stop), axis=1)


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
        images, masks = (np.array(stored, np.float32) for stored in (self.images, self.masks))
        return {'images': images, 'masks': masks, 'rng': self.rng.get_state()}

    def load_state_dict(self, state, image_shape, mask_shape):
        """`state` of a pool of this size holding (3, H, W) images with (M, H, W) masks."""
        images, masks = state['images'], state['masks']
        arrays = isinstance(images, np.ndarray) and isinstance(masks, np.ndarray)
        if not (
            arrays
            and images.dtype.kind == masks.dtype.kind == 'f'
            and len(images) == len(masks) <= self.size
            and (len(images) == 0 or (images.shape[1:], masks.shape[1:]) == (image_shape, mask_shape))
        ):
            raise ValueError(
                f'a pool of {np.shape(images)} images of {np.asarray(images).dtype} '
                f'and {np.shape(masks)} masks does not fit a pool of {self.size} '
                f'{image_shape} and {mask_shape}'
            )
        self.images, self.masks = list(images), list(masks)
        self.rng.set_state(tuple(state['rng']))


def learning_rate(base, epoch, decay_start, max_epoch):
    """The official schedule for epoch 0, 1, ...: constant for `decay_start` epochs, then
    linear decay, base * (1 - (epoch + 1 - decay_start) / (max_epoch - decay_start + 1))."""
    decay_epochs = max_epoch - decay_start
    return base * (1.0 - max(0, epoch + 1 - decay_start) / float(decay_epochs + 1))


def keep_values(*variables):
    """The step reads these after forward(clear_no_need_grad=True) and
    backward(clear_buffer=True), which free every buffer not marked persistent."""
    for variable in variables:
        variable.persistent = True


def train(args):
    for flag in ['model_save_path', 'monitor_path']:  # its files would be read as images
        check_not_in_dataset(getattr(args, flag), f'--{flag.replace("_", "-")}')
    processes, args.device_id = start_processes(args.context, args.device_id)
    args.context, accelerate = set_context(args.context, args.device_id, args.type_config, args.cpu_conv)
    nn.clear_parameters()
    nn.seed(args.seed)  # parameter initialisers draw from nnabla's own generator
    with Loaders.of(args, share=(processes.rank, processes.size)) as loaders:
        networks = (
            models.training_memory(args, loaders.ins_max) if args.context == 'cpu' else 0
        )  # not a GPU's
        check_training_memory(args, loaders.ins_max, networks + loaders.memory())
        loaders.verify()
        with Run.for_training(args, run_files(SERIES), processes.rank) as run:
            trainer = Trainer(args, loaders.ins_max, processes)
            accelerate(*trainer.graph_outputs())
            monitors = Monitors(
                args.monitor_path, SERIES, args.log_step, processes.rank == 0, args.model_save_path
            )
            parts = dict(pools=trainer, loaders=loaders, monitors=monitors)  # restored in this order
            checkpoints = Checkpoints(args, trainer.solvers, loaders, run, processes, **parts)
            place = checkpoints.start(FIXED_ON_RESUME, CHANGEABLE_ON_RESUME, models.current_parameter_name)
            train_epochs(args, trainer, loaders, monitors, checkpoints, run, place)


def train_epochs(args, trainer, loaders, monitors, checkpoints, run, place):
    """From `place` (iteration, epoch, samples of it trained on) to the end of --max-epoch,
    with a checkpoint every --save-interval epochs and when a stop signal asks for one. An
    epoch is a pass over the larger domain, whatever the number of ranks."""
    iteration, first_epoch, samples = place
    processes, global_batch = trainer.processes, args.batch_size * trainer.processes.size
    per_epoch = math.ceil(max(loaders.sizes.values()) / global_batch)
    run.start_training()
    visuals, start = {}, min(per_epoch, samples // global_batch)
    for epoch in range(first_epoch, args.max_epoch):
        trainer.set_epoch(epoch)
        monitors.timer.start()  # the timer counts iterations, not checkpoints and pictures
        with Progress(
            per_epoch, start, f'epoch {epoch + 1}/{args.max_epoch}', shown=processes.rank == 0
        ) as progress:
            for position in range(start + 1, per_epoch + 1):
                losses, _, step_visuals = trainer.step(*loaders.next_batches(), iteration)
                losses = processes.mean_losses(losses, SERIES)
                visuals.update(step_visuals)
                monitors.add(iteration, losses)
                iteration += 1
                progress.update(losses)
                if processes.any(run.stop.received):
                    saved = checkpoints.save(iteration, epoch + position // per_epoch, position % per_epoch)
                    run.stopped(iteration, saved)
        start = 0
        if processes.rank == 0 and ((epoch + 1) % args.save_interval == 0 or epoch + 1 == args.max_epoch):
            logger.info(f'epoch {epoch + 1}: saved {checkpoints.save(iteration, epoch + 1, 0)}')
        monitors.save_pictures(epoch + 1, visuals, LOSS_NAMES)


def main(argv=None):
    try:
        train(get_args(argv))
    except RunError as error:
        error.exit('train.py')


if __name__ == '__main__':
    main()
