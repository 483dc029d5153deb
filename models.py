"""InstaGAN networks: a set-structured ResNet generator and a spectrally normalised PatchGAN
discriminator (Mo, Cho, Shin, ICLR 2019, sections 2.1-2.2).

Images are (B, 3, H, W) and instance masks (B, N, H, W), both in [-1, 1]. A slot whose mask is
-1 everywhere is an empty instance (padding up to --ins-max). Every mask goes through one shared
encoder, and the set feature of a sample is the sum over its non-empty instances, so the order
of the slots does not matter and the samples of a batch never mix (the PyTorch original sums
over the batch axis and so only works with batch size 1).

Use every function under `nn.parameter_scope(...)`: the scope names the network. The graphs
are plain NNabla on every device; on the CPU, cpu_engine.accelerate can move a built graph's
convolutions and normalisations onto every core afterwards, with the same parameters.
"""

import math
import re

import nnabla as nn
import nnabla.functions as F
import nnabla.initializer as I
import nnabla.parametric_functions as PF


def check_sizes(height, width, n_layers_D=None):
    """The network sizes these networks take; raises ValueError saying why not. The generator's
    two stride-2 convolutions and their transposes need multiples of 4, and its residual blocks
    reflect-pad H/4 x W/4 maps by one pixel, which needs two. Each stride-2 layer of the
    discriminator halves the size, and its last two 4x4 convolutions take one pixel each."""
    smallest = max(8, 3 * 2**n_layers_D if n_layers_D else 0)
    for name, size in [('height', height), ('width', width)]:
        if size % 4 or size < smallest:
            layers = f' (--n-layers-D {n_layers_D})' if n_layers_D else ''
            raise ValueError(
                f'a network {name} of {size} is not a multiple of 4 of at least {smallest}{layers}'
            )


def slots_per_pass(ins_per, instances):
    """K, the instance slots one pass translates: --ins-per, but no more than there are."""
    return max(1, min(ins_per, instances))


def pass_slices(instances, per_pass):
    """The slots of each pass of sequential mini-batch translation (paper section 2.3):
    instances rounded up to a whole number of passes of `per_pass` slots."""
    return [slice(p * per_pass, (p + 1) * per_pass) for p in range(max(1, math.ceil(instances / per_pass)))]


def current_parameter_name(name):
    """Today's name of a parameter saved by an earlier version, which kept PF's layer scope out
    (LAYER/W, LAYER/b, LAYER/spectral-norm/u for today's LAYER/conv/W, ...; up0 and up1 are
    deconvolutions); today's names come back unchanged."""
    match = re.fullmatch(r'(.*/)?([^/]+)/(W|b|spectral-norm/u)', name)
    if not match or match.group(2) in ('conv', 'deconv'):
        return name
    kind = 'deconv' if re.fullmatch(r'up\d+', match.group(2)) else 'conv'
    return f'{match.group(1) or ""}{match.group(2)}/{kind}/{match.group(3)}'


def generator_init():
    # Made per call: an initialiser keeps the generator it was made with, and nn.seed()
    # replaces nnabla's generator.
    return I.NormalInitializer(0.02)


def discriminator_init(fan_in):
    """PyTorch's default Conv2d initialisation, U(+-1/sqrt(fan_in)) for weights and biases
    alike: the official code's SpectralNorm hides `weight` from its N(0, 0.02) initialiser,
    so its discriminator starts from this. The scale matters to Adam's steps."""
    bound = 1 / math.sqrt(fan_in)
    return I.UniformInitializer((-bound, bound))


def convolution(x, outmaps, kernel, stride=1, pad=0, reflect=0, name='conv'):
    """Generator convolution of x, zero-padded by `pad` or reflection-padded by `reflect` pixels."""
    if reflect:
        x = F.pad(x, (reflect,) * 4, mode='reflect')
    return PF.convolution(
        x,
        outmaps,
        (kernel, kernel),
        pad=(pad, pad),
        stride=(stride, stride),
        w_init=generator_init(),
        name=name,
    )


def upsample(x, outmaps, name='deconv'):
    """3x3 transposed convolution, stride 2, output padding 1: exactly doubles H and W."""
    return PF.deconvolution(
        x,
        outmaps,
        (3, 3),
        pad=(1, 1),
        stride=(2, 2),
        output_padding=(1, 1),
        w_init=generator_init(),
        name=name,
    )


def spectral_norm_convolution(x, outmaps, stride, fix_parameters, name='conv'):
    """The discriminator's 4x4 convolution, zero-padded by 1 pixel, with a spectrally normalised
    weight (Miyato et al. 2018)."""
    init = discriminator_init(x.shape[1] * 4 * 4)
    return PF.convolution(
        x,
        outmaps,
        (4, 4),
        pad=(1, 1),
        stride=(stride, stride),
        w_init=init,
        b_init=init,
        fix_parameters=fix_parameters,
        apply_w=PF.spectral_norm,
        name=name,
    )


def instance_norm(x, eps=1e-5):
    """Instance normalisation without affine parameters.

    Not F.instance_normalization: it computes E[x^2] - E[x]^2, which loses digits on the
    near two-level maps a binary mask's first convolutions make (on the bundled sample's masks
    after the initial stem convolution, up to 1.8e-3 off float64 at 64x48 and 4.0e-2 at
    300x200; on other two-level maps more, and NaN where the difference comes out negative).
    Here the mean comes first and the variance is the mean squared deviation, both summed a
    row at a time, so that no float32 sum runs over a whole map (5e-5 off at most).
    """

    def spatial_mean(values):
        return F.mean(F.mean(values, axis=3, keepdims=True), axis=2, keepdims=True)

    centred = x - spatial_mean(x)
    return centred / F.pow_scalar(spatial_mean(centred * centred) + eps, 0.5)


def residual_block(x, name):
    with nn.parameter_scope(name):
        h = F.relu(instance_norm(convolution(x, x.shape[1], 3, reflect=1, name='conv1')))
        h = instance_norm(convolution(h, x.shape[1], 3, reflect=1, name='conv2'))
    return x + h


def encoder(x, ngf, n_blocks):
    """7x7 stem, two stride-2 convolutions, residual blocks: (B, C, H, W) -> (B, 4ngf, H/4, W/4)."""
    h = F.relu(instance_norm(convolution(x, ngf, 7, reflect=3, name='stem')))
    for i in range(2):
        h = F.relu(instance_norm(convolution(h, ngf * 2 ** (i + 1), 3, stride=2, pad=1, name=f'down{i}')))
    for i in range(n_blocks):
        h = residual_block(h, f'res{i}')
    return h


def decoder(feature, out_channels):
    """Two upsamplings that halve the channels, then a 7x7 convolution to tanh outputs."""
    h = feature
    for i in range(2):
        h = F.relu(instance_norm(upsample(h, h.shape[1] // 2, name=f'up{i}')))
    return F.tanh(convolution(h, out_channels, 7, reflect=3, name='out'))


def instance_exists(masks):
    """(B, N) float 1/0: whether a slot holds an instance (any value above -1), as the paper's code.

    sign(max(peak + 1, 0)) with sign(0) = 0 is F.greater_scalar(peak, -1) value for value (NaN
    and -inf give 0, +inf 1), in float operations that the ONNX converter exports: its
    GreaterScalar becomes a boolean Greater that it never casts back, which ReduceMax refuses.
    alpha=0 (sign(0) = 0, as ONNX's Sign) must be given: NNabla's default is 1, and the
    converter drops the argument.
    """
    peak = F.max(masks, axis=(2, 3))
    peak.need_grad = False  # a 0/1 indicator has no gradient (Sign's backward is a pass-through)
    return F.sign(F.maximum_scalar(peak + 1, 0), alpha=0)


def slot_weights(exists):
    """(B, N) -> (B, N, 1, 1, 1), the shape encode_set multiplies the features by."""
    return F.reshape(exists, exists.shape + (1, 1, 1))


def encode_set(masks, weights, encode):
    """Encode every slot with the shared `encode`; return per-instance features (B, N, C, h, w),
    zero for empty slots (`weights`: slot_weights of instance_exists), and the set feature
    (B, C, h, w), their sum over the slots."""
    batch, slots, height, width = masks.shape
    features = encode(F.reshape(masks, (batch * slots, 1, height, width)))
    features = F.reshape(features, (batch, slots) + features.shape[1:])
    features = features * weights
    return features, F.sum(features, axis=1)


def generator(image, masks, ngf=64, n_blocks=9):
    """Translate an image and its instance masks; returns (image_out, masks_out) shaped as the
    inputs.

    Empty slots (all -1) contribute nothing to the set feature and come out unchanged.
    """
    batch, slots, height, width = masks.shape
    # `exists` is reshaped once, and its other shape is taken from that reshape: the ONNX
    # converter names a Reshape's shape constant after its input, so two Reshapes of one
    # variable would clash.
    weights = slot_weights(instance_exists(masks))
    with nn.parameter_scope('image_encoder'):
        image_feature = encoder(image, ngf, n_blocks)
    with nn.parameter_scope('mask_encoder'):
        instance_features, set_feature = encode_set(masks, weights, lambda x: encoder(x, ngf, n_blocks))
    with nn.parameter_scope('image_decoder'):
        image_out = decoder(F.concatenate(image_feature, set_feature, axis=1), 3)

    # Each instance is decoded from [its own feature, the image feature, the set feature].
    context = F.concatenate(image_feature, set_feature, axis=1)
    context = F.reshape(context, (batch, 1) + context.shape[1:])
    if slots > 1:  # nnabla's broadcast costs as much when it has nothing to repeat
        context = F.broadcast(context, (batch, slots) + context.shape[2:])
    per_instance = F.concatenate(instance_features, context, axis=2)
    with nn.parameter_scope('mask_decoder'):
        decoded = decoder(F.reshape(per_instance, (batch * slots,) + per_instance.shape[2:]), 1)
    decoded = F.reshape(decoded, (batch, slots, height, width))
    exists = F.reshape(weights, (batch, slots, 1, 1))
    masks_out = exists * decoded + (1 - exists) * masks
    return image_out, masks_out


def generator_pass(image, pass_masks, ngf=64, n_blocks=9):
    """One pass of sequential mini-batch translation (paper section 2.3) over the instance slots
    `pass_masks`. Returns (image_out, masks_out, active): `active` (B,) is 1 for the samples with
    an instance in these slots; the others keep their image unchanged."""
    image_out, masks_out = generator(image, pass_masks, ngf, n_blocks)
    active = F.max(instance_exists(pass_masks), axis=1)
    keep = F.reshape(active, (-1, 1, 1, 1))
    return keep * image_out + (1 - keep) * image, masks_out, active


def patch_features(x, ndf, n_layers, fix_parameters):
    """Spectrally normalised stride-2 4x4 convolutions: (B, C, H, W) -> (B, ndf*2^(n-1),
    ~H/2^n, ~W/2^n)."""
    h = x
    for n in range(n_layers):
        h = spectral_norm_convolution(h, ndf * min(2**n, 8), 2, fix_parameters, name=f'conv{n}')
        h = F.leaky_relu(instance_norm(h) if n else h, 0.2)
    return h


def discriminator(image, masks, ndf=64, n_layers=3, fix_parameters=False):
    """LSGAN patch scores (B, 1, h, w) for an image together with its set of instance masks.

    fix_parameters: for the generators' adversarial loss, which needs no gradient of the
    discriminator's own weights."""
    with nn.parameter_scope('image_features'):
        image_feature = patch_features(image, ndf, n_layers, fix_parameters)
    with nn.parameter_scope('mask_features'):
        _, set_feature = encode_set(
            masks,
            slot_weights(instance_exists(masks)),
            lambda x: patch_features(x, ndf, n_layers, fix_parameters),
        )
    with nn.parameter_scope('classifier'):
        h = F.concatenate(image_feature, set_feature, axis=1)
        h = spectral_norm_convolution(h, 2 * ndf * min(2**n_layers, 8), 1, fix_parameters, name='conv0')
        h = F.leaky_relu(instance_norm(h), 0.2)
        return spectral_norm_convolution(h, 1, 1, fix_parameters, name='conv1')


# Memory ---------------------------------------------------------------------------------------
#
# What a configuration needs, estimated from its sizes before anything is built: a network of
# --ngf 100000, or a batch of 100000, would otherwise end in a MemoryError deep in nnabla or in
# the kernel's OOM killer. Parameters are counted exactly (tests/test_reliability.py checks the
# counts against the built networks). For activations, every function's output of a forward
# pass is counted, the 3 maps each instance normalisation adds included, at the input's size;
# as clear_buffer frees most of them as soon as they are used, only ACTIVATION_SHARE of that
# count is alive at once. The constants fit the peak resident memory of train.py and
# translate.py on the CPU (nnabla 1.39), measured at 131 MB to 5.1 GB for 32x24 to 300x200
# networks of ngf 4 to 64 and batches of 1 and 2 (with full image pools, which those short runs
# did not reach, the estimates lie 9% to 31% above), and for translations of 64x44 to
# 1000x1000 (30% to 37% above). Large batches are overestimated: a second 300x200 sample took
# 0.57 GB, estimated at 1.0 GB.

FLOAT_BYTES = 4
PROGRAM_BYTES = 160 * 2**20  # Python, nnabla, numpy and the CPU engine, before any network
# Data, gradient and Adam's two moments, and a checkpoint's copies serialised in memory.
TRAINING_PARAMETER_COPIES = 12.5
# The parameter file read whole, and the networks' own copy.
TRANSLATION_PARAMETER_COPIES = 3
ACTIVATION_SHARE = 0.3


def convolution_parameters(inputs, outputs, kernel):
    return inputs * outputs * kernel * kernel + outputs


def generator_parameter_count(ngf, n_blocks):
    def encoder(channels):
        return (
            convolution_parameters(channels, ngf, 7)
            + convolution_parameters(ngf, 2 * ngf, 3)
            + convolution_parameters(2 * ngf, 4 * ngf, 3)
            + 2 * n_blocks * convolution_parameters(4 * ngf, 4 * ngf, 3)
        )

    def decoder(channels, outputs):
        return (
            convolution_parameters(channels, channels // 2, 3)
            + convolution_parameters(channels // 2, channels // 4, 3)
            + convolution_parameters(channels // 4, outputs, 7)
        )

    return encoder(3) + encoder(1) + decoder(8 * ngf, 3) + decoder(12 * ngf, 1)


def discriminator_parameter_count(ndf, n_layers):
    def features(channels):
        count = 0
        for n in range(n_layers):
            outputs = ndf * min(2**n, 8)
            count += convolution_parameters(channels, outputs, 4) + outputs  # + spectral norm's u
            channels = outputs
        return count, channels

    image, channels = features(3)
    masks, _ = features(1)
    middle = 2 * ndf * min(2**n_layers, 8)
    return (
        image
        + masks
        + convolution_parameters(2 * channels, middle, 4)
        + middle
        + convolution_parameters(middle, 1, 4)
        + 1
    )


def encoder_outputs(channels, ngf, n_blocks):
    """Floats a forward pass of `encoder` makes per input pixel: its padded input, then per
    convolution the output, 3 maps of instance normalisation and the activation; per residual
    block two of those, their padding and the sum, at a sixteenth of the pixels."""
    return channels + ngf * (5 + 5 * 2 / 4 + 5 * 4 / 16 + n_blocks * 12 * 4 / 16)


def decoder_outputs(channels, outputs):
    """The same for `decoder` of a `channels`-map feature at a sixteenth of the pixels."""
    return channels * (5 / 2 / 4 + 5 / 4 + 1 / 4) + 2 * outputs


def generator_outputs(slots, ngf, n_blocks):
    """Floats a forward pass of `generator` with `slots` instance slots makes per pixel of a
    sample: the image's and each mask's encoder, the image decoder, and per slot the context it
    is decoded with and the mask decoder."""
    return (
        encoder_outputs(3, ngf, n_blocks)
        + slots * encoder_outputs(1, ngf, n_blocks)
        + decoder_outputs(8 * ngf, 3)
        + slots * (12 * ngf / 16 + 8 * ngf / 16 + decoder_outputs(12 * ngf, 1))
    )


def discriminator_outputs(slots, ndf, n_layers):
    """The same for `discriminator` of an image and `slots` masks."""
    per_input = sum(5 * ndf * min(2**n, 8) / 4 ** (n + 1) for n in range(n_layers))
    return (1 + slots) * per_input


def training_memory(args, ins_max):
    """Bytes train.py's networks, solvers and image pools need for its flags `args` and ins_max
    slots in the data: both directions' passes of K slots, the discriminator on all M of them,
    and two pools of M-slot fakes, copied when checkpointed."""
    ins_per = slots_per_pass(args.ins_per, ins_max)
    slots = pass_slices(ins_max, ins_per)[-1].stop
    pixels = args.fineSizeH * args.fineSizeW
    generator = generator_parameter_count(args.ngf, args.n_blocks)
    parameters = 2 * (generator + discriminator_parameter_count(args.ndf, args.n_layers_D))
    outputs = 2 * generator_outputs(ins_per, args.ngf, args.n_blocks)
    activations = (
        args.batch_size * pixels * (outputs + discriminator_outputs(slots, args.ndf, args.n_layers_D))
    )
    pools = 3 * 2 * args.pool_size * (3 + slots) * pixels
    return int(
        PROGRAM_BYTES
        + FLOAT_BYTES * (TRAINING_PARAMETER_COPIES * parameters + ACTIVATION_SHARE * activations + pools)
    )


def translation_memory(size, ins_per, ngf, n_blocks, directions=1):
    """Bytes the Translators of `directions` generators need: one image of `size` (H, W) and
    `ins_per` slots a pass."""
    parameters = generator_parameter_count(ngf, n_blocks)
    activations = size[0] * size[1] * generator_outputs(ins_per, ngf, n_blocks)
    return int(
        PROGRAM_BYTES
        + FLOAT_BYTES
        * directions
        * (TRANSLATION_PARAMETER_COPIES * parameters + ACTIVATION_SHARE * activations)
    )
