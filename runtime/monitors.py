"""What a training run shows while it trains, in nnabla.monitor's formats, so that
nnabla.monitor.plot_series and plot_time_elapsed read it:

    Arguments.txt              the run's flags, one `name: value` a line
    NAME.series.txt            `iteration value` every --log-step iterations (MonitorSeries)
    elapsed_time.timer.txt     `iteration seconds iterations total_seconds` (MonitorTimeElapsed)
    translation_*_epoch_N.png  an epoch's last translations; losses.png, the curves so far

Unlike nnabla's monitors, these never empty a file when created (a fresh run starts without
one) and continue it exactly on resume through state_dict/load_state_dict.
"""

import gc
import io
import math
import os
import re
import sys
import time

import numpy as np
from nnabla.logger import logger
from tqdm import tqdm

from runtime import RunError
from runtime.checkpoints import checkpoint_paths
from runtime.files import WriteFailed, append_line, write_bytes, write_image, write_text

TIMER = 'elapsed_time'


def write_arguments(folder, args):
    write_text(
        os.path.join(folder, 'Arguments.txt'),
        ''.join(f'{name}: {value}\n' for name, value in sorted(vars(args).items())),
    )


def lines_before(path, iteration):
    """Keep only the lines of a monitor file for iterations before `iteration`: those after a
    checkpoint were written by iterations now being redone."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if re.match(r'\d+ ', line) and int(line.split()[0]) < iteration]
    write_text(path, ''.join(kept))


class SeriesFile:
    """NAME.series.txt: a line `iteration mean` when iteration + 1 is a multiple of `interval`,
    the mean of the values added since the line before."""

    def __init__(self, folder, name, interval):
        self.path = os.path.join(folder, name + '.series.txt')
        self.interval = interval
        self.pending = []
        self.next_iteration = 0

    def add(self, iteration, value):
        self.pending.append(value)
        self.next_iteration = iteration + 1
        if self.next_iteration % self.interval == 0:
            append_line(self.path, f'{iteration} {np.mean(self.pending):g}')
            self.pending = []

    def state_dict(self):
        # An array, not a JSON list: a NaN loss (--nan-policy warn) is no JSON number.
        return {'next_iteration': self.next_iteration, 'pending': np.array(self.pending, np.float64)}

    @staticmethod
    def parse(state):
        """(next iteration, pending values) of a state_dict(); earlier versions kept the values
        as a JSON list. ValueError unless it is one."""
        next_iteration, pending = state['next_iteration'], state['pending']
        numbers = (
            pending.dtype.kind == 'f' and pending.ndim == 1
            if isinstance(pending, np.ndarray)
            else isinstance(pending, list) and all(type(v) in (int, float) for v in pending)
        )
        if type(next_iteration) is not int or next_iteration < 0 or not numbers:
            raise ValueError(f'series state {state!r}')
        return next_iteration, [float(v) for v in pending]

    def load_state_dict(self, state):
        self.next_iteration, self.pending = self.parse(state)
        lines_before(self.path, self.next_iteration)


class TimerFile:
    """elapsed_time.timer.txt: every `interval` iterations, the seconds since the line before,
    the iterations they took and the seconds of training so far (across resumes)."""

    def __init__(self, folder, interval):
        self.path = os.path.join(folder, TIMER + '.timer.txt')
        self.interval = interval
        self.total = 0.0  # seconds of training up to the last line
        self.lap = 0.0  # seconds since then
        self.since = None  # perf_counter at the last add
        self.next_iteration = 0

    def start(self):
        self.since = time.perf_counter()

    def add(self, iteration):
        now = time.perf_counter()
        self.lap += now - self.since
        self.since = now
        self.next_iteration = iteration + 1
        if self.next_iteration % self.interval == 0:
            self.total += self.lap
            append_line(self.path, f'{iteration} {self.lap:.6f} {self.interval} {self.total:.6f}')
            self.lap = 0.0

    def state_dict(self):
        return {'next_iteration': self.next_iteration, 'total': self.total, 'lap': self.lap}

    @staticmethod
    def parse(state):
        """(next iteration, total, lap) of a state_dict(); ValueError unless it is one."""
        values = [state['next_iteration'], state['total'], state['lap']]
        if type(values[0]) is not int or not all(
            type(v) in (int, float) and 0 <= v < math.inf for v in values
        ):
            raise ValueError(f'timer state {state!r}')
        return values

    def load_state_dict(self, state):
        self.next_iteration, self.total, self.lap = self.parse(state)
        lines_before(self.path, self.next_iteration)


class Monitors:
    """The loss series `names` and the timer of one run; they write only where `writes` (rank 0
    of a data-parallel run). A line that cannot be written stops the run, naming the checkpoint
    in `resume_from` to continue from: the files would lag the state a checkpoint holds."""

    def __init__(self, folder, names, interval, writes=True, resume_from=None):
        self.folder, self.writes, self.resume_from = folder, writes, resume_from
        self.series = {name: SeriesFile(folder, name, interval) for name in names}
        self.timer = TimerFile(folder, interval)

    def add(self, iteration, losses):
        if not self.writes:
            return
        try:
            for name, value in losses.items():
                self.series[name].add(iteration, value)
            self.timer.add(iteration)
        except WriteFailed as error:
            paths = checkpoint_paths(self.resume_from) if self.resume_from else []
            then = (
                f'; {paths[-1]} is intact: continue from it with --resume'
                if paths
                else ', before its first checkpoint'
            )
            raise RunError(f'{error}; stopped at iteration {iteration}{then}') from None

    def save_pictures(self, epoch, visuals, loss_names):
        """The epoch's translation tiles ({source: [(images, masks) of the batch, of the
        translation, of the reconstruction]}) and losses.png."""
        if self.writes:
            tiles = {
                f'translation_{source}2{"y" if source == "x" else "x"}': [
                    [image_panel(i) for i, _ in rows],
                    [mask_panel(m) for _, m in rows],
                ]
                for source, rows in visuals.items()
            }
            save_pictures(self.folder, epoch, tiles, loss_names)

    def state_dict(self):
        return {
            'series': {name: s.state_dict() for name, s in self.series.items()},
            'timer': self.timer.state_dict(),
        }

    def load_state_dict(self, state):
        parts = [(series, state['series'][name]) for name, series in self.series.items()]
        parts.append((self.timer, state['timer']))
        # Every state is checked before a file is cut back: a damaged checkpoint must not
        # cost the lines an older one needs.
        for part, part_state in parts:
            part.parse(part_state)
        for part, part_state in parts:
            part.load_state_dict(part_state)


class Progress:
    """Progress through `total` steps: a tqdm bar on a terminal; where stderr is not one (a log
    file), a plain line every `every` seconds and at the end, not a bar's carriage returns.
    The values named in `names` of what update() is given are shown beside the count."""

    SHOWN = ['generator_loss_x', 'discriminator_loss_y']

    def __init__(self, total, initial, description, every=60, shown=True, names=SHOWN):
        self.total, self.count, self.description, self.every = total, initial, description, every
        self.shown, self.names, self.bar = shown, names, None

    def __enter__(self):
        if self.shown and sys.stderr.isatty():
            self.bar = tqdm(
                total=self.total, initial=self.count, desc=self.description, leave=False, dynamic_ncols=True
            )
        self.last = time.monotonic()
        return self

    def __exit__(self, *exc_info):
        if self.bar is not None:
            self.bar.close()  # before any message, so that the bar is gone

    def update(self, losses=None):
        self.count += 1
        shown = {name: f'{losses[name]:.3g}' for name in self.names if name in (losses or {})}
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(shown)
        elif self.shown and (time.monotonic() - self.last >= self.every or self.count == self.total):
            self.last = time.monotonic()
            values = ''.join(f' {name} {value}' for name, value in shown.items())
            logger.info(f'{self.description}: {self.count}/{self.total}{values}')


def image_panel(images):
    """Sample 0 of (B, 3, H, W) images in [-1, 1] -> (H, W, 3) in [0, 1]."""
    return (np.clip(images[0], -1, 1).transpose(1, 2, 0) + 1) / 2


def mask_panel(masks):
    """Sample 0 of (B, N, H, W) masks in [-1, 1] -> (H, W, 3), one colour per instance slot."""
    palette = np.array(
        [
            [1, 0.2, 0.2],
            [0.2, 1, 0.2],
            [0.3, 0.5, 1],
            [1, 1, 0.2],
            [1, 0.2, 1],
            [0.2, 1, 1],
            [1, 0.6, 0.2],
            [0.7, 0.7, 0.7],
        ]
    )
    weights = (np.clip(masks[0], -1, 1) + 1) / 2
    colours = palette[np.arange(len(weights)) % len(palette)]
    return np.max(weights[:, :, :, None] * colours[:, None, None, :], axis=0)


def save_tile(path, rows):
    """Write rows of (H, W, 3) panels in [0, 1] as one PNG."""
    tile = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
    write_image(path, (tile * 255).round().astype(np.uint8))


def plot_losses(folder, loss_names):
    """Redraw FOLDER/losses.png from the series files of `loss_names` (each _x and _y)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(loss_names), figsize=(4 * len(loss_names), 3.2))
    try:
        for axis, name in zip(axes, loss_names):
            for domain in 'xy':
                path = os.path.join(folder, f'{name}_{domain}.series.txt')
                if os.path.exists(path) and os.path.getsize(path):
                    series = np.loadtxt(path, ndmin=2)
                    axis.plot(series[:, 0], series[:, 1], label=domain)
            axis.set_title(name.replace('_', ' '))
            axis.set_xlabel('iteration')
            if axis.lines:
                axis.legend()
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format='png', dpi=80)
        write_bytes(os.path.join(folder, 'losses.png'), buffer.getvalue())
    finally:
        plt.close(figure)
        # A figure is a web of reference cycles: left to the collector's own schedule, a few
        # dozen accumulate (tens of MB) before they are freed.
        gc.collect()


def save_pictures(folder, epoch, tiles, loss_names):
    """The epoch's tiles ({name: rows of panels}) and losses.png. They are for looking at:
    failing to write them (a full disk, say) is a warning, and training goes on."""
    try:
        for name, rows in tiles.items():
            save_tile(os.path.join(folder, f'{name}_epoch_{epoch:04d}.png'), rows)
        plot_losses(folder, loss_names)
    except Exception as error:
        logger.warning(f'epoch {epoch}: pictures not written ({type(error).__name__}: {error})')
