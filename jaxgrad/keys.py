"""PRNG keys: the one check of "is this a key", and the one schedule every key derives from.

Every random number jaxgrad draws during training comes from a key the user gave (or, for a
DP run with no key, one drawn from OS entropy by :func:`entropy_key`) through one schedule:

.. math::

    k_t = \\mathrm{fold\\_in}(K, t), \\qquad
    (k_t^{\\text{sample}}, k_t^{\\text{noise}}) = \\mathrm{split}(k_t), \\qquad
    \\ell_t = \\mathrm{fold\\_in}(\\mathrm{fold\\_in}(L, \\lambda), t), \\qquad
    \\ell_{t,i} = \\mathrm{fold\\_in}(\\ell_t, i)

for step ``t``, the example at row ``i`` of the training set, the run's ``key`` ``K``, its
``loss_key`` ``L`` and the constant ``λ = 0x6C6F7373`` (ASCII "loss"); a plain run's shuffle of
epoch ``e`` is ``permutation(fold_in(K, e))`` (:func:`epoch_key`): :func:`step_key`,
:func:`dp_keys` (the Poisson draw and the DP noise of one step) and :func:`loss_step_key` /
:func:`row_key` / :func:`row_keys` (randomness inside the loss, such as dropout, plain and
private runs alike). Each is a function of ``(K, t)`` or ``(L, t, i)`` only — not of the
batching, the devices or the processes — so a mesh run draws what one device draws and a
resumed run what an uninterrupted one draws.

**Why λ.** For a Threefry key (JAX's default) ``fold_in(k, d)`` *is* Threefry block ``(0, d)``
of ``k``, ``split(k, n)[b]`` block ``(0, b)``, and the Gaussian noise reads blocks ``0, 1, …``
of its key (:func:`jaxgrad.privacy.threefry.words_at`). So every key and every word of
randomness is a node of one tree, named by its path of blocks from ``K``: the step key is
``(t)``, the sample and noise keys ``(t, 0)`` and ``(t, 1)``, the clip count's key
``(t, 0x636C6970)`` (:func:`clip_count_key`), noise word ``j`` ``(t, 1, j)``; the Poisson
draw reads blocks ``2⁶³ + i`` of the sample key, and the keys of a truncated draw and of a
draw without replacement are its blocks ``2⁶²`` and ``2⁶² + 1``
(:func:`jaxgrad.privacy.sampling.draw_key`): no ``fold_in`` or ``split`` names those, and
no noise reads them. Every node the DP reads begins ``(t, b)`` with ``b`` one of
``0``, ``1``, ``0x636C6970``. Without ``λ`` a ``loss_key`` derived from ``K`` — ``fold_in(K,
1)``, ``split(K)[0]`` — put the loss keys on those nodes: with ``L = fold_in(K, 1)``, row
``i``'s key of step 1 was ``(1, 1, i)``, step 1's noise word ``i``, and the dropout a function
of the noise that hides the clipped sum. With ``λ`` the loss keys are the nodes below
``L``'s child ``λ``:

* ``L`` a descendant of ``K``, path ``p``: loss keys ``p + (λ, t, i, …)``. With ``p = (c)``
  (``fold_in(K, c)``, ``split(K)[c]``) they would need ``λ`` as a DP node's second block:
  never. Longer ``p`` meet the DP's nodes only if ``p`` begins ``(t, b)``, ``L`` derived from
  a sample, noise or clip-count key itself (e.g. ``L`` = step ``t``'s noise key: its block
  ``λ`` is noise word ``λ`` of a model of more than ``λ ≈ 1.8·10⁹`` parameters) — don't.
* ``L`` an ancestor of ``K`` (``K`` = ``L``'s path ``a``): the DP's nodes begin with ``a``,
  the loss keys with ``λ``: apart unless ``a`` begins with ``λ``.
* Otherwise (siblings such as ``split(R)``, unrelated keys): disjoint subtrees.
* ``L = K``: the loss keys ``(λ, t, i)`` would be step ``λ``'s; refused
  (:func:`check_distinct`).

Barring a collision of Threefry itself, no loss key is then (or derives from) a sample, noise,
clip-count or truncation key, nor a word of the noise.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import os
import secrets
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np


def is_typed_key(x) -> bool:
    """Whether ``x`` has a typed PRNG key dtype (``jax.random.key``), of any shape."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def key_data(x):
    """The ``uint32`` data of a typed key (array), or ``x`` itself for raw keys."""
    return jax.random.key_data(x) if is_typed_key(x) else x


@functools.cache
def _raw_key_shape(impl: str) -> tuple[int, ...]:
    """The shape of a raw (``uint32``) key of the PRNG implementation ``impl``."""
    return jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape


def check_key(key, *, name: str = "key"):
    """Checks ``key`` is one PRNG key: a typed key of shape ``()`` or a raw ``uint32`` key.

    Works on traced keys (it reads only the dtype and shape).

    Raises:
      TypeError: not a key (e.g. an int seed), naming ``name``.
      ValueError: a batch of keys.

    Example::

      >>> import jax
      >>> from jaxgrad.keys import check_key
      >>> check_key(jax.random.key(0)).shape
      ()
    """
    dtype = getattr(key, "dtype", None)
    shape = np.shape(key) if dtype is not None else None
    if is_typed_key(key):
        if shape != ():
            raise ValueError(
                f"`{name}` must be one PRNG key; got a batch of keys of shape {shape} "
                "(pass one key, or jax.vmap over the keys)"
            )
        return key
    raw = _raw_key_shape(str(jax.config.jax_default_prng_impl))
    if dtype == np.uint32 and len(shape) == len(raw) + 1 and shape[1:] == raw:
        raise ValueError(
            f"`{name}` must be one PRNG key; got a batch of raw keys of shape {shape} "
            "(pass one key, or jax.vmap over the keys)"
        )
    if dtype == np.uint32 and shape == raw:
        return key  # a raw (legacy) key of the default implementation
    got = f"an array of shape {shape} and dtype {dtype}" if dtype is not None else repr(key)
    hint = " (an int is a seed, not a key)" if isinstance(key, (int, np.integer)) else ""
    raise TypeError(
        f"`{name}` must be one PRNG key, e.g. jax.random.key(0) (or a raw uint32{list(raw)} "
        f"key); got {got}{hint}"
    )


def check_distinct(key, loss_key, *, name: str = "loss_key", key_name=None, why=None) -> None:
    """Refuses a private run's ``loss_key`` equal to its ``key`` (the same key data), or any
    two keys that must draw independent randomness (``key_name``, ``why``).

    Every loss key hangs below ``fold_in(loss_key, λ)``, ``λ = 0x6C6F7373``
    (:func:`loss_step_key`; the module's "Why λ"), so a ``loss_key`` derived from ``key`` by
    ``fold_in`` or ``split`` (``fold_in(key, 1)``, ``split(key)[0]``), or one ``key`` derives
    from, never gives the loss a key or word the DP reads, barring a Threefry collision — and
    short of a ``loss_key`` derived from a step's sample, noise or clip-count key itself, or a
    ``key`` derived from ``fold_in(loss_key, λ)``. The same key is what is left: row ``i``'s
    loss key of step ``t = 0, 1``, ``fold_in(fold_in(fold_in(K, λ), t), i)``, would be word
    ``i`` of step ``λ``'s sample or noise key. No run reaches step ``λ ≈ 1.8·10⁹``, but the
    loss's randomness and the DP's would then hang on one key, ``λ`` apart: refused. Traced
    keys (under ``jax.jit``) have no value to compare: nothing is checked.

    Args:
      key, loss_key: the two keys.
      name: ``loss_key``'s name in the error.
      key_name: ``key``'s name (default: the private run's ``key``).
      why: what the same key would do (default: the loss keys', above).

    Raises:
      ValueError: naming ``name``.

    Example::

      >>> import jax
      >>> from jaxgrad.keys import check_distinct
      >>> check_distinct(jax.random.key(0), jax.random.key(1))  # different: nothing to say
    """
    if not (_inspectable(key) and _inspectable(loss_key)):
        return
    with jax.ensure_compile_time_eval():  # (see _inspectable)
        same = np.array_equal(np.asarray(key_data(key)), np.asarray(key_data(loss_key)))
    if same:
        if why is None:
            why = (
                "The loss's keys (dropout, augmentation) and the Poisson draws and noise would "
                "all derive from one key: pass another key (e.g. jax.random.key(1), or "
                "jax.random.fold_in(key, 1)), or leave key=None (OS entropy)"
            )
        against = "the private run's `key`" if key_name is None else f"`{key_name}`"
        raise ValueError(f"`{name}` must differ from {against}; got the same key data. {why}")


def _inspectable(key) -> bool:
    """Whether ``key``'s data can be read here: not traced (under ``jax.jit``), nor spread
    over several processes. A concrete key closed over in the caller's ``jax.jit`` is
    inspectable, but read under ``jax.ensure_compile_time_eval``: its ``key_data`` would
    otherwise be staged into the trace, a tracer numpy cannot read."""
    if isinstance(key, jax.core.Tracer):
        return False
    return not (isinstance(key, jax.Array) and not key.is_fully_addressable)


class SeededKeyWarning(UserWarning):
    """A private run was given a key made from a small integer seed (:func:`is_seeded`)."""


def is_seeded(key) -> bool:
    """Whether ``key`` is ``jax.random.key(seed)`` for a seed in ``[0, 2³²)`` (of its own PRNG
    implementation): Threefry's key data ``(0, seed)``, the RBG keys' ``(0, seed, 0, seed)``.

    Such a key holds at most 32 bits, so whoever guesses or searches the seed reproduces
    every Poisson draw and noise vector of a DP run, and the ε it reports certifies
    nothing. A key from :func:`entropy_key` has this form with probability ``2⁻³²``.

    Example::

      >>> import jax, numpy as np
      >>> from jaxgrad.keys import is_seeded
      >>> other = jax.random.wrap_key_data(np.array([7, 1234], np.uint32))
      >>> is_seeded(jax.random.key(1234)), is_seeded(other)
      (True, False)
    """
    key = check_key(key)
    data = np.asarray(key_data(key)).ravel()
    if data[0] != 0:  # the seed's high word, 0 in every form: most keys end here, cheaply
        return False  # (check_private_key runs at every eager call of dp_grad's f)
    impl = jax.random.key_impl(key) if is_typed_key(key) else None
    seeded = jax.random.key(np.uint32(data[-1]), impl=impl)  # (0, s), or rbg's (0, s, 0, s)
    return bool(np.array_equal(data, np.asarray(jax.random.key_data(seeded)).ravel()))


def warn_if_seeded(key, *, name: str = "key") -> None:
    """A :class:`SeededKeyWarning` when a private run's ``key`` is :func:`is_seeded`, shown at
    the caller's line outside jaxgrad (not at the entry point's own)."""
    if is_seeded(key):
        warnings.warn(
            f"`{name}` of this private run is jax.random.key(seed) for a seed below 2**32 (its "
            "key data is (0, seed)): whoever finds the seed reproduces every Poisson draw and "
            "noise vector, and the ε reported assumes nobody can. Pass jaxgrad.keys."
            "entropy_key() (or, to jaxgrad.train.fit, key=None: OS entropy, kept in the "
            "checkpoints)",
            SeededKeyWarning,
            stacklevel=_outside_jaxgrad(),
        )


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _outside_jaxgrad() -> int:
    """The ``stacklevel`` of :func:`warn_if_seeded`'s first caller outside this package."""
    frame, level = sys._getframe(2), 2  # frame 1 is warn_if_seeded itself
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


# The key whose SeededKeyWarning the caller has given already (:func:`checked_seed`).
_WARNED: contextvars.ContextVar = contextvars.ContextVar("jaxgrad_seeded_key_warned", default=None)


def check_private_key(key, *, name: str = "key"):
    """:func:`check_key` for a key whose bits a privacy guarantee rests on — a DP step's
    noise, its Poisson draw, a privatizer's key — with a :class:`SeededKeyWarning` when it
    :func:`is_seeded`; every public entry point of :mod:`jaxgrad.privacy` (and
    :func:`jaxgrad.train.fit`) that takes such a key checks it here.

    Only a concrete key is inspected (also one closed over in the caller's ``jax.jit``): a
    traced key, an argument of ``jax.jit``, has no value (nothing to say, no error), nor does
    a key spread over several processes. Within
    :func:`checked_seed` of the same key data, no second warning.

    Returns:
      ``key``.

    Raises:
      TypeError / ValueError: as :func:`check_key`.

    Example::

      >>> import warnings, jax
      >>> from jaxgrad.keys import SeededKeyWarning, check_private_key, entropy_key
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     _ = check_private_key(jax.random.key(0)), check_private_key(entropy_key())
      >>> [w.category.__name__ for w in caught]
      ['SeededKeyWarning']
    """
    key = check_key(key, name=name)
    if not _inspectable(key):
        return key
    done = _WARNED.get()
    with jax.ensure_compile_time_eval():  # (see _inspectable)
        if done is None or not np.array_equal(np.asarray(key_data(key)), done):
            warn_if_seeded(key, name=name)
    return key


@contextlib.contextmanager
def checked_seed(key):
    """Within it, :func:`check_private_key` does not warn again about ``key`` (the same key
    data): for a caller that warned already and hands ``key`` on, as :func:`jaxgrad.train.fit`
    to the privatizer it builds."""
    token = _WARNED.set(np.asarray(key_data(key)))
    try:
        yield
    finally:
        _WARNED.reset(token)


def fingerprint(key) -> str:
    """A short hash of a key's data, to tell runs with different keys apart (not secret-safe
    for low-entropy keys: a key made from a small seed can be found from its hash)."""
    return hashlib.sha256(np.asarray(key_data(key)).tobytes()).hexdigest()[:16]


def entropy_key(impl: str | None = None):
    """A typed key whose data is drawn from the operating system's entropy (``secrets``).

    What a DP run uses when the user gives no key: every word of the key data is random (64
    bits for Threefry-2x32), unlike ``jax.random.key(seed)``, which without
    ``jax_enable_x64`` keeps only 32 bits of the seed, a space an adversary can search.

    Example::

      >>> from jaxgrad.keys import entropy_key
      >>> entropy_key().shape
      ()
    """
    impl = impl or str(jax.config.jax_default_prng_impl)
    shape = _raw_key_shape(impl)
    words = np.frombuffer(secrets.token_bytes(4 * int(np.prod(shape))), np.uint32)
    return jax.random.wrap_key_data(words.reshape(shape), impl=impl)


def same_in_every_process(key):
    """Process 0's ``key`` in every process of a multi-process run (``key`` itself in one).

    For a key drawn by :func:`entropy_key`, which differs between processes: the Poisson draw
    of a DP step is computed in every process and must be the same draw.
    """
    if jax.process_count() == 1:
        return key
    from jax.experimental import multihost_utils

    data = np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(key_data(key))))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def epoch_key(key, epoch):
    """``fold_in(key, epoch)``: the key of a plain run's shuffle of epoch ``epoch``."""
    return jax.random.fold_in(key, epoch)


def step_key(key, step):
    """``fold_in(key, step)``: the key of training step ``step`` (0-based)."""
    return jax.random.fold_in(key, step)


def split_step_key(step_key_):
    """``(sample_key, noise_key) = split(step_key)``: a DP-SGD step's Poisson draw and noise."""
    sample_key, noise_key = jax.random.split(step_key_)
    return sample_key, noise_key


def dp_keys(key, step):
    """``split(fold_in(key, step))``: one DP-SGD step's Poisson draw and noise keys, independent
    of each other and of every other step's."""
    return split_step_key(step_key(key, step))


# fold_in(loss_key, λ) roots every loss key: a loss_key derived from the run's key (fold_in(K,
# 1) = step 1's key, split(K)[0] = step 0's) would otherwise make row i's key of step t a DP
# key or noise word (the module's "Why λ"). Like _CLIP_COUNT_BLOCK, far from any step number.
_LOSS_BLOCK = 0x6C6F7373  # "loss"
# What a checkpoint of a run with a loss_key records (jaxgrad.train.run_config): one written
# under the former fold_in(fold_in(loss_key, t), row) lacks it and is not resumed with others.
LOSS_KEY_SCHEDULE = f"fold_in(fold_in(fold_in(loss_key, 0x{_LOSS_BLOCK:X}), t), row)"


def loss_step_key(loss_key, step):
    """``fold_in(fold_in(loss_key, 0x6C6F7373), step)``: the key from which the loss keys of
    training step ``step`` derive (:func:`row_key`), in plain and private runs alike; never a
    key or noise word of the DP keys of a ``key`` that ``loss_key`` derives from (or that
    derives from it; the module's "Why λ")."""
    return step_key(jax.random.fold_in(loss_key, _LOSS_BLOCK), step)


def row_key(step_key_, row):
    """``fold_in(step_key, row)``: the key of the example at ``row`` within a step, given the
    step's loss key (:func:`loss_step_key`)."""
    return jax.random.fold_in(step_key_, row)


def row_keys(loss_key, step, rows):
    """One loss key per row of a batch: ``fold_in(fold_in(fold_in(loss_key, 0x6C6F7373),
    step), row)`` for each of ``rows`` (:func:`loss_step_key`, :func:`row_key`)."""
    return jax.vmap(row_key, in_axes=(None, 0))(loss_step_key(loss_key, step), rows)


# fold_in(k, d) is Threefry block (0, d) of k: split(k) takes blocks 0 and 1 (the sample and
# noise keys), and fold_in(noise_key, j) would be the words of the gradient noise's own
# counter j. The count's key takes a block of the step key far from both.
_CLIP_COUNT_BLOCK = 0x636C6970  # "clip"


def clip_count_key(key, step):
    """``fold_in(fold_in(key, step), 0x636C6970)``: the key of step ``step``'s noisy count of
    adaptive clipping (:mod:`jaxgrad.privacy.adaptive`), independent of the step's sample
    and gradient noise keys (:func:`dp_keys`) and of every other step's."""
    return jax.random.fold_in(step_key(key, step), _CLIP_COUNT_BLOCK)


def augmentation_keys(example_key, copies: int):
    """``split(example_key, (2, K))``: the ``K`` keys of an example's augmented copies and the
    ``K`` keys of the loss on each copy (augmentation multiplicity,
    :func:`jaxgrad.privacy.augmented_loss`), independent of each other."""
    both = jax.random.split(example_key, (2, copies))
    return both[0], both[1]
