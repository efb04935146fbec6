"""``python -m jaxgrad.train --dp``: the DP-SGD plan of the --dp flags, and the secret key
of the run's noise and sampling (from OS entropy, the checkpoint being resumed, or, not
private, --insecure-dp-seed)."""

from __future__ import annotations

from jaxgrad import strategies
from jaxgrad.train._cli_args import ADAPTIVE_ONLY, DP_DEFAULTS, DP_FLAGS
from jaxgrad.train._cli_checks import flag_error

# The first 32-bit word of a DP key derived from --insecure-dp-seed. OS-entropy keys never
# start with it (drawn again if they do), so a key restored from a checkpoint tells whether
# the run that wrote it was private, whatever the flags of the resuming command.
INSECURE_KEY_MARK = 0x1A5EC0DE


def privacy_plan(args, parser, num_examples, batch_size, epochs, model=None):
    """The resolved DP-SGD plan (σ calibrated), or None without --dp; with --per-layer-clip,
    ``C / √L`` for each of the model's ``L`` layers
    (:func:`jaxgrad.train.private.per_layer_clip`)."""
    if not args.dp:
        return None
    if args.strategy == "clipped" or strategies.get(args.strategy).name != "batch_grad":
        parser.error("--dp takes its own noisy clipped gradient; leave --strategy at batch")
    if args.checkpoint_every is not None:
        parser.error("--dp checkpoints every epoch; --checkpoint-every does not apply")
    if (args.target_epsilon is None) == (args.noise_multiplier is None):
        parser.error("--dp needs exactly one of --target-epsilon and --noise-multiplier")
    import jax

    from jaxgrad.train import PrivacyConfig, private

    given = {k: getattr(args, k) for k in DP_DEFAULTS}
    given = {k: DP_DEFAULTS[k] if v is None else v for k, v in given.items()}
    if args.per_layer_clip:
        try:
            shapes = jax.eval_shape(model.init, jax.random.key(0))
            given["l2_clip"] = private.per_layer_clip(shapes, l2_clip=given["l2_clip"])
        except (ValueError, TypeError) as e:
            flag_error(parser, str(e), DP_FLAGS)
    config = PrivacyConfig(
        **given,
        target_epsilon=args.target_epsilon,
        noise_multiplier=args.noise_multiplier,
        physical_batch_size=args.physical_batch_size,
        **_bandmf_fields(args, parser),
        adaptive_clip=_adaptive_clip(args, parser),
    )
    try:
        return private.plan(config, num_examples=num_examples, batch_size=batch_size, epochs=epochs)
    except (ValueError, TypeError) as e:
        flag_error(parser, e, DP_FLAGS)  # the library names arguments; the user typed flags


def _bandmf_fields(args, parser) -> dict:
    """The PrivacyConfig fields of --bands and --bandmf-strategy."""
    if args.bands is None:
        if args.bandmf_strategy is not None:
            parser.error("--bandmf-strategy needs --bands (the number of bands of BandMF noise)")
        return {}
    fields = {"noise": "bandmf", "bands": args.bands}
    if args.bandmf_strategy is not None:
        fields["bandmf_strategy"] = args.bandmf_strategy
    return fields


def _adaptive_clip(args, parser):
    """``--adaptive-clip-*``'s :class:`jaxgrad.privacy.AdaptiveClip`, or None."""
    if args.adaptive_clip_quantile is None:
        for name in ADAPTIVE_ONLY:
            if getattr(args, name) is not None:
                flag = "--" + name.replace("_", "-")
                parser.error(f"{flag} needs --adaptive-clip-quantile (adaptive clipping)")
        return None
    from jaxgrad.privacy import AdaptiveClip

    return AdaptiveClip(
        target_quantile=args.adaptive_clip_quantile,
        learning_rate=0.2 if args.adaptive_clip_lr is None else args.adaptive_clip_lr,
        count_noise_multiplier=args.count_noise_multiplier,
    )


def restore_point(args, params, optimizer, plan):
    """``(key_data, epoch)`` of the DP checkpoint this run resumes from, else ``(None, 0)``.

    A resumed --dp run must go on with the key it started with (the one in the checkpoint),
    not with this invocation's fresh one, which ``fit`` would refuse as another run's.
    Anything unreadable or not from a DP run is left to ``fit``, which names the problem.
    """
    import warnings

    import jax
    import numpy as np

    from jaxgrad import keys
    from jaxgrad.train import checkpoint as ckpt
    from jaxgrad.train import private
    from jaxgrad.train.step import init_state

    if args.checkpoint_dir is None or args.no_resume:
        return None, 0
    # The state of the optimizer fit runs: headed by adaptive clipping's or BandMF's
    # privatizer, whose state is checkpointed with it (any key gives the template's shapes).
    template_key = keys.entropy_key()
    ran = private.run_optimizer(optimizer, plan, template_key)
    template = {"state": init_state(params, ran), "key": template_key}
    try:
        with warnings.catch_warnings():  # fit warns about skipped files itself
            warnings.simplefilter("ignore", ckpt.CheckpointWarning)
            restored = ckpt.restore_latest(args.checkpoint_dir, template)
    except (ckpt.CheckpointError, OSError, ValueError):
        return None, 0
    if restored is None or "privacy" not in (restored[1].get("config") or {}):
        return None, 0
    tree, meta, _ = restored
    return np.asarray(jax.random.key_data(tree["key"])), int(meta.get("epoch", 0))


def dp_key(args, restored_key):
    """The key of a --dp run's Poisson draws and noise: ``(key, source, private)``.

    From OS entropy (64 bits or more, all of the key's data: ``jax.random.key(seed)`` would
    keep 32 bits of a seed without x64), from the checkpoint being resumed, or, not private,
    from --insecure-dp-seed. Every process of a multi-process run uses process 0's key: the
    Poisson draw must be the same in all of them.
    """
    import jax
    import numpy as np

    from jaxgrad import keys

    if args.insecure_dp_seed is not None:
        data = np.zeros(jax.random.key_data(jax.random.key(0)).shape, np.uint32)
        data.flat[0], data.flat[-1] = INSECURE_KEY_MARK, args.insecure_dp_seed
        key, source = jax.random.wrap_key_data(data), "insecure-dp-seed"
    elif restored_key is not None:
        key, source = jax.random.wrap_key_data(np.asarray(restored_key, np.uint32)), "checkpoint"
    else:
        key = keys.entropy_key()
        while int(np.asarray(keys.key_data(key)).flat[0]) == INSECURE_KEY_MARK:
            key = keys.entropy_key()  # (probability 2**-32) never read as an insecure key
        source = "os-entropy"
    key = keys.same_in_every_process(key)
    private = int(np.asarray(keys.key_data(key)).flat[0]) != INSECURE_KEY_MARK
    return key, source, private
