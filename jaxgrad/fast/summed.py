"""Summed weights: effective weights that are sums of parts each linear in one leaf.

Where an effective weight is a sum of parts each linear in one leaf (:class:`Fold`,
:func:`summed_weights`), a part ``θ'`` whose Jacobian is the identity (read off the equation's
JVP, :func:`identity_tangent`: the straight-through estimator
``W + stop_gradient(q(W) - W)``, ``W0`` of ``W0 + A @ B``) gives its leaf the uses as they
are, and a part ``θ' · M`` (LoRA's ``A @ B``) the dense uses with ``M`` folded into ``A``
or ``G`` (:func:`_folded_use`); the pass reads a folded use's ``A`` and ``G`` through
:func:`folded`. No per-example ``∇_{W_eff}`` is formed.

The transformation these are read from, and what they share with scaled and selected
weights (:mod:`jaxgrad.fast.scaled`), are :mod:`jaxgrad.fast.reparam`'s.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax

from jaxgrad.fast.program import Const, Eqn, Program, Var, flat_jaxpr, shaped
from jaxgrad.fast.reparam import alias_of_leaf, closed, lead_chain
from jaxgrad.fast.trace import IDENTITIES, Use, use_perm


@dataclasses.dataclass(frozen=True)
class Fold:
    """How a use of a *summed* effective weight ``W_eff = Σ_p T_p`` (every part linear in
    one leaf, the rest of ``W_eff`` carrying no gradient to it) is a fast use of that leaf θ.

    * ``T = θ'`` (an alias of θ): the Jacobian of ``W_eff`` with respect to θ' is the
      identity, so ``∇_θ' S_i = ∇_{W_eff} S_i``: the use as it is, with another forward
      value. Fake quantisation's straight-through estimator
      ``W + stop_gradient(q(W) - W)``, a ``custom_jvp`` whose tangent map is the identity,
      and ``W0`` of a merged LoRA ``W0 + A B`` are of this form (no ``a``, ``g``).
    * ``T = θ' · M`` (a ``dot_general`` with an example-independent ``M``: another leaf,
      a constant, a value with no gradient): for a dense use ``op(X, W_eff)``,
      ``op(X, θ' · M)`` is bilinear in ``(X, θ')`` once ``M`` is contracted with ``X``
      (``A' = X · M``, einsum ``a``) or with the output (``G' = G · Mᵀ``, einsum ``g``, the
      transpose of the map from the smaller output ``Z = op'(X, θ')`` to the use's): the
      leaf's use is ``op'`` on ``(A', θ')`` with cotangent ``G'``, every rule of a dense use
      applies, and no ``B × |W_eff|`` array is formed. Merged LoRA: ``∇_A S_i =
      X_iᵀ (G_i Bᵀ)`` (``B`` folded into ``G``), ``∇_B S_i = (X_i A)ᵀ G_i`` (``A`` into ``A``).

    ``what`` says which (for the plan); ``ref`` is ``M``; ``a`` and ``g`` are ``jnp.einsum``
    specs on one example's ``A`` (with ``M``) and ``G`` (with ``M``, or a transpose alone),
    ``""`` for none, the example axes as ``...``.
    """

    what: str
    ref: Any = None  # Var | Const
    a: str = ""
    g: str = ""
    # Scalars with no gradient the part is multiplied by, ``(ref, inverse)``: on ``G``.
    scales: tuple = ()

    @property
    def active(self) -> bool:
        """Whether ``A`` or ``G`` is changed (``op`` is not the use's own equation)."""
        return bool(self.a or self.g or self.scales)

    def apply(self, side: str, x, m):
        """``A`` (``side="a"``) or ``G`` (``"g"``), examples first, with ``M = m`` folded."""
        spec = self.a if side == "a" else self.g
        if not spec:
            return x
        ops = (x, m) if "," in spec else (x,)
        return jax.numpy.einsum(spec, *ops, precision=jax.lax.Precision.HIGHEST)


def refolded(u: Use) -> bool:
    """Whether a use's ``A`` or ``G`` is folded with a matrix (:class:`Fold`): its ``op`` is
    then not the captured equation's, and ``A``, ``G`` must be read through :func:`folded`."""
    return u.fold is not None and u.fold.active


def fold_refs(uses: dict) -> list:
    """The values the folded uses among ``uses`` (leaf -> [Use]) read their matrices ``M``
    and scalars from, once each (evaluated with the scaled uses' factors)."""
    refs = [r for us in uses.values() for u in us if refolded(u)
            for r in (u.fold.ref, *(ref for ref, _ in u.fold.scales))]  # fmt: skip
    return list(dict.fromkeys(r for r in refs if isinstance(r, Var)))


def folded(u: Use, side: str, x, values: dict):
    """``A`` (``side="a"``) or ``G`` (``"g"``) of use ``u``, examples first, with its fold's
    ``M`` applied (unchanged for a use that is not folded); ``values`` holds the
    :func:`fold_refs`' values."""
    if not refolded(u):
        return x
    value = lambda r: r.value if isinstance(r, Const) else values[r]
    x = u.fold.apply(side, x, None if u.fold.ref is None else value(u.fold.ref))
    for ref, inverse in u.fold.scales if side == "g" else ():
        c = value(ref)
        x = x * (1 / c if inverse else c)
    return x


def identity_tangent(e: Eqn, q: int) -> bool:
    """Whether equation ``e``'s linear part with respect to operand ``q`` (the others held,
    no gradient reaching them) is the identity map: its JVP, traced with the other operands'
    tangents zero, returns the input tangent itself (through same-dtype identities only:
    :data:`jaxgrad.fast.trace.IDENTITIES`).

    Decided from the linearisation, not the primitive's name: ``θ + c`` and ``θ - c`` for
    a ``c`` with no gradient, a ``custom_jvp`` rule ``(q(θ), t)`` (a straight-through
    rounding), ``jnp.round(θ)``'s own JVP (zero) is not.
    """
    if len(e.outs) != 1 or tuple(e.in_avals[q].shape) != tuple(e.out_avals[0].shape):
        return False
    if e.in_avals[q].dtype != e.out_avals[0].dtype:
        return False
    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in e.in_avals]

    def tangent(*args):
        ops, t = list(args[:-1]), args[-1]

        def f(x):
            ins = [*ops[:q], x, *ops[q + 1 :]]
            y = e.primitive.bind(*ins, **e.primitive.get_bind_params(e.params))
            return y[0] if e.primitive.multiple_results else y

        return jax.jvp(f, (ops[q],), (t,))[1]

    try:
        lin = flat_jaxpr(jax.make_jaxpr(tangent)(*structs, structs[q]))
    except Exception:  # (a primitive that cannot be re-bound abstractly: not known)
        return False
    producer = {o: k for k, x in enumerate(lin.eqns) for o in x.outs}
    r = lin.outs[0]
    while isinstance(r, Var) and r in producer:
        x = lin.eqns[producer[r]]
        same = x.in_avals[0].dtype == x.out_avals[0].dtype
        if x.primitive.name not in IDENTITIES or not same:
            return False
        r = x.ins[0]
    return r == lin.invars[-1]


def _summands(program: Program, producer: dict, deps: dict, n: int, ref):
    """``ref`` as a sum of parts each linear in one leaf: ``(parts, straight)`` with parts
    ``("id", (leaf, chain), scales)`` (``θ'``) or ``("dot", (k, perm), scales)`` (equation
    ``k``, a ``dot_general`` of aliases of leaves, each times scalars with no gradient, and
    values with no gradient, its result transposed by ``perm``: ``(A @ B).T``, PyTorch's
    ``W0 + (B A)ᵀ``), each times the
    scalars ``scales`` (``(ref, inverse)``: ``alpha / r * (A @ B)``, ``W0 - A @ B``) that
    carry no gradient; ``straight`` when a part carries a value with no gradient (a
    straight-through estimator); None if not of that form."""
    if not isinstance(ref, Var) or not deps.get(ref):
        return [], False  # no gradient reaches a leaf through it
    theta = alias_of_leaf(program, producer, n, ref)
    if theta is not None:
        return [("id", theta, ())], False
    k = producer.get(ref)
    if k is None:
        return None
    e = program.eqns[k]
    grads = [i for i, r in enumerate(e.ins) if isinstance(r, Var) and deps.get(r)]
    perm = tuple(range(len(e.out_avals[0].shape)))
    if e.primitive.name == "transpose" and isinstance(e.ins[0], Var) and e.ins[0] in producer:
        perm, k = e.params["permutation"], producer[e.ins[0]]  # a part's product, transposed
        e = program.eqns[k]
        grads = [i for i, r in enumerate(e.ins) if isinstance(r, Var) and deps.get(r)]
        if e.primitive.name != "dot_general":
            return None
    if e.primitive.name == "dot_general":  # (batch axes: a stack of parts, e.g. vmapped)
        leaves = [_scaled_alias(program, producer, deps, n, e.ins[i]) for i in grads]
        return ([("dot", (k, tuple(perm)), ())], False) if None not in leaves else None
    shape = tuple(e.out_avals[0].shape)
    name = e.primitive.name
    inner = lambda q: _summands(program, producer, deps, n, e.ins[q])
    if name in ("add", "sub") and grads:
        if any(tuple(e.in_avals[i].shape) != shape for i in grads):
            return None  # (a gradient broadcast to the sum)
        return _sum_of_summands(program, producer, n, e, grads, inner)
    if name == "neg":
        return _times(inner(0), (Const(-1.0), False))
    if name in ("mul", "div") and len(grads) == 1 and (name == "mul" or grads == [0]):
        q = grads[0]
        if tuple(e.in_avals[1 - q].shape) == () and tuple(e.in_avals[q].shape) == shape:
            return _times(inner(q), (e.ins[1 - q], name == "div"))  # (a scalar, no gradient)
    if len(grads) == 1 and identity_tangent(e, grads[0]):
        got = inner(grads[0])
        if got is None:
            return None
        # (as for a sum: a custom_jvp of θ alone, a straight-through rounding)
        rest = [r for i, r in enumerate(e.ins) if i != grads[0]]
        straight = not rest or _reads_own_leaf(program, producer, n, got[0], rest)
        return got[0], got[1] or straight
    return None


def _times(got, scale):
    """The summands ``got`` (:func:`_summands`' result, or None) each times the scalar
    ``scale``, ``(ref, inverse)``."""
    if got is None:
        return None
    return [(kind, x, (*fs, scale)) for kind, x, fs in got[0]], got[1]


def _sum_of_summands(program: Program, producer: dict, n: int, e: Eqn, grads, inner):
    """The summands of ``add`` or ``sub`` equation ``e`` (its operands ``grads`` carrying
    gradients, ``inner(i)`` the summands of operand ``i``), or None."""
    parts, straight = [], False
    for i in grads:
        got = inner(i)
        if e.primitive.name == "sub" and i == 1:
            got = _times(got, (Const(-1.0), False))
        if got is None:
            return None
        parts, straight = parts + got[0], straight or got[1]
    rest = [r for i, r in enumerate(e.ins) if i not in grads]
    return parts, straight or _reads_own_leaf(program, producer, n, parts, rest)


def _reads_own_leaf(program: Program, producer: dict, n: int, parts, rest) -> bool:
    """Whether the values ``rest``, which carry no gradient, read the leaf of a ``θ'`` part:
    the value changed by one of the part's own leaves (``θ + stop_gradient(q(θ) - θ)``), a
    straight-through estimator; else ``θ' + c``."""
    own = {x[0] for kind, x, _ in parts if kind == "id"}
    return bool(own & _read_leaves(program, producer, n, rest))


def _scaled_alias(program: Program, producer: dict, deps: dict, n: int, ref):
    """``((leaf, chain), scales)`` when ``ref`` is a parameter leaf through alias equations
    times scalars with no gradient (``alpha / r * A`` as a factor of ``A @ B``: the scalars
    of a bilinear part move to its result), else None."""
    scales: list = []
    while isinstance(ref, Var) and ref in producer:
        e = program.eqns[producer[ref]]
        grads = [i for i, r in enumerate(e.ins) if isinstance(r, Var) and deps.get(r)]
        name = e.primitive.name
        if name == "neg":
            scales.append((Const(-1.0), False))
        elif name in ("mul", "div") and len(grads) == 1 and (name == "mul" or grads == [0]):
            q = grads[0]
            if e.in_avals[1 - q].shape != () or e.in_avals[q].shape != e.out_avals[0].shape:
                break
            scales.append((e.ins[1 - q], name == "div"))
        else:
            break
        ref = e.ins[grads[0] if name != "neg" else 0]
    theta = alias_of_leaf(program, producer, n, ref)
    return None if theta is None else (theta, tuple(scales))


def _read_leaves(program: Program, producer: dict, n: int, refs) -> set:
    """The parameter leaves the values ``refs`` are computed from (gradient or not)."""
    out, seen, todo = set(), set(), [r for r in refs if isinstance(r, Var)]
    while todo:
        r = todo.pop()
        if r in seen:
            continue
        seen.add(r)
        if r in program.invars[:n]:
            out.add(program.invars.index(r))
        elif r in producer:
            todo.extend(x for x in program.eqns[producer[r]].ins if isinstance(x, Var))
    return out


def _folded_use(program: Program, u: Use, e: Eqn, p: int, chain: tuple, what: str, scales, perm):
    """Use ``u`` of ``W_eff = ... + θ' · M + ...`` (``e`` the ``dot_general`` making the part,
    transposed by ``perm`` into ``W_eff``'s axes; ``θ' = e.ins[p]`` the alias of a leaf
    through ``chain``) as a use of that leaf: ``op`` on
    ``θ'`` with ``M`` folded into ``A`` or ``G`` (see :class:`Fold`), or None where no fold is
    written (a use that is not dense, a chain that is not transposes only).

    Batch axes (a layer stack: a use of the slice a scan is scanned over, lifted over the
    steps, of ``W_eff[l] = W0[l] + A[l] @ B[l]`` made by a ``vmap``) are einsum labels that
    every operand carrying them shares and keeps: ``M[l]`` folds into step ``l``'s ``A`` or
    ``G``."""
    if u.kind != "dense" or u.split >= 0 or u.select:
        return None
    ndim = len(e.out_avals[0].shape)
    # use operand axis i is W_eff axis use_to_eff[i] (a leaf scanned over: the lifted operand's)
    use_to_eff = use_perm(program, u, ndim, lifted=True)
    if use_to_eff is None:
        return None
    # One einsum label per axis: the use's operands and output, then the part's operands,
    # whose free and batch axes are W_eff's (eff) and so the use's parameter operand's.
    names = iter(string.ascii_letters)
    lab, y = _use_labels(u.op, names)
    x_lab, w_lab = lab[1 - u.pos], lab[u.pos]
    eff = [None] * ndim
    for i, w in enumerate(use_to_eff):
        eff[w] = w_lab[i]
    made = [None] * ndim  # the part's result axes: W_eff axis j is its axis perm[j]
    for j, w in enumerate(perm):
        made[w] = eff[j]
    rl, free = _part_labels(e, made, names)
    t_lab, m_lab = rl[p], rl[1 - p]
    where = _fold_side(x_lab, m_lab, [m_lab[d] for d in free[1 - p]], y)
    if where is None:
        return None
    side, kept, a_spec = where
    ops = [None, None]
    ops[1 - u.pos], ops[u.pos] = kept, t_lab
    sizes = {
        x: size
        for labels, a in [*zip(lab, u.op.in_avals, strict=True), *zip(rl, e.in_avals, strict=True)]
        for x, size in zip(labels, a.shape, strict=True)
    }
    # The axes op' keeps: the use's output's, and folded into G, the part's batch axes too
    # (M_l varies along them: a use contracting over l, per-head LoRA `thk,hkd->td`, sums
    # Z_l M_l over l after the fold, so Z keeps l).
    part_batch = [rl[0][d] for d in e.params["dimension_numbers"][1][0]]
    op, z = _folded_dot(u.op, ops, sizes, y if side == "A" else [*y, *part_batch])
    g_spec = _g_spec(side, y, z, m_lab)
    if g_spec is None:
        return None
    fold = Fold(f"{what} (folded into {side})", e.ins[1 - p], a_spec, g_spec, scales)
    if u.site == "":
        return dataclasses.replace(u, op=op, chain=chain, fold=fold)
    nest = tuple(dataclasses.replace(lv, chain=()) for lv in u.nest)
    return dataclasses.replace(u, op=op, chain=(), pre_chain=chain, nest=nest, fold=fold)


def _use_labels(op: Eqn, names) -> tuple:
    """Einsum labels (drawn from ``names``) of a dense use's operand axes, a contracted or
    batch pair sharing one, and of its output (the batch axes, then the free ones, the
    lhs's first)."""
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    lab = [[None] * len(a.shape) for a in op.in_avals]
    for d0, d1 in [*zip(lc, rc, strict=True), *zip(lb, rb, strict=True)]:
        lab[0][d0] = lab[1][d1] = next(names)
    lab = [[x or next(names) for x in side] for side in lab]
    paired = ((*lc, *lb), (*rc, *rb))
    y = [lab[0][d] for d in lb]
    y += [x for q in (0, 1) for d, x in enumerate(lab[q]) if d not in paired[q]]
    return lab, y


def _part_labels(e: Eqn, eff: list, names) -> tuple:
    """Einsum labels of the operands of the part's ``dot_general`` ``e``: a contracted pair
    shares a new one (from ``names``), the batch pairs and the free axes (the part's output
    axes, in order) carry ``W_eff``'s labels ``eff``; and each operand's free axes."""
    (ec0, ec1), (eb0, eb1) = e.params["dimension_numbers"]
    rl = [[None] * len(a.shape) for a in e.in_avals]
    for d0, d1 in zip(ec0, ec1, strict=True):
        rl[0][d0] = rl[1][d1] = next(names)
    for label, d0, d1 in zip(eff, eb0, eb1, strict=False):  # (eff: batch axes first)
        rl[0][d0] = rl[1][d1] = label
    paired = ((*ec0, *eb0), (*ec1, *eb1))
    free = [[d for d in range(len(rl[q])) if d not in paired[q]] for q in (0, 1)]
    frees = [(q, d) for q in (0, 1) for d in free[q]]
    for label, (side, d) in zip(eff[len(eb0) :], frees, strict=True):
        rl[side][d] = label
    return rl, free


def _fold_side(x_lab, m_lab, m_free, y):
    """Where ``M`` (labels ``m_lab``, free ones ``m_free``) folds for a use with operand ``X``
    (``x_lab``) and output ``y``: ``("A", labels of X · M, its einsum)`` where every free axis
    of ``M`` meets ``X``, ``("G", x_lab, "")`` where each meets the output, else None.
    (``M``'s axes that are batch axes of the part or the use stay on ``X · M``.)"""
    j = "".join
    if m_free and all(x in x_lab for x in m_free):  # M meets X: folded into A
        kept = [x for x in x_lab if x not in m_free or x in y]
        kept += [x for x in m_lab if x not in x_lab]
        return "A", kept, f"...{j(x_lab)},{j(m_lab)}->...{j(kept)}"
    if all(x in y for x in m_free):  # M meets the output (or the use's batch axes): into G
        return "G", x_lab, ""
    return None


def _folded_dot(op: Eqn, ops: list, sizes: dict, keep) -> tuple:
    """``(op', z)``: the dense use ``op`` on operands labelled ``ops`` (the folded ``A`` and
    ``θ'``), contracting the labels they share but those in ``keep`` (batch axes), and its
    output's labels ``z``."""
    shared = [x for x in ops[0] if x in ops[1]]
    batch = [x for x in shared if x in keep]
    summed = [x for x in shared if x not in keep]
    pick = lambda labels: (
        tuple(ops[0].index(x) for x in labels),
        tuple(ops[1].index(x) for x in labels),
    )
    dn = (pick(summed), pick(batch))
    z = batch + [x for q in (0, 1) for x in ops[q] if x not in shared]
    avals = [
        shaped(tuple(sizes[x] for x in o), a.dtype) for o, a in zip(ops, op.in_avals, strict=True)
    ]
    out = [shaped(tuple(sizes[x] for x in z), op.out_avals[0].dtype)]
    params = {**op.params, "dimension_numbers": dn}
    return dataclasses.replace(op, params=params, in_avals=avals, out_avals=out), z


def _g_spec(side: str, y, z, m_lab):
    """The einsum from the use's ``G`` (labels ``y``) to the folded use's (``z``): with ``M``
    where it folds into ``G``, else a transpose alone (``""``: none); None where the labels
    do not match."""
    j = "".join
    if side == "G":
        return f"...{j(y)},{j(m_lab)}->...{j(z)}" if set(z) <= set(y) | set(m_lab) else None
    if sorted(z) != sorted(y):
        return None
    return "" if z == y else f"...{j(y)}->...{j(z)}"


def summed_weights(program: Program, n: int, outputs, deps: dict, uses: dict, skip) -> tuple:
    """Effective weights that are sums of parts each linear in one leaf (see :class:`Fold`):
    ``(leaf -> [Use], the effective weights taken)`` for the leaves whose every used
    effective weight is one of these.

    ``W_eff = θ' + c`` (``c`` with no gradient, any number of identity-Jacobian steps:
    the straight-through estimator), ``W0 + A @ B`` (merged LoRA; ``W0`` as it is, ``A`` and
    ``B`` folded; ``W0 + alpha / r * (A @ B)``, ``W0 - A @ B``: each part times scalars with
    no gradient, folded into ``G``): each part's leaf gets the uses of
    ``W_eff``, as they are (``θ'``, any fast use outside a scanned-over slice; a lookup at
    the top level only) or folded (``θ' · M``, a dense use, see :func:`_folded_use`). A
    leaf in several parts or weights has every one (tied uses).
    """
    producer = {o: k for k, e in enumerate(program.eqns) for o in e.outs}
    found: dict = {}  # v -> [(leaf, [Use])]
    for v, out in enumerate(outputs):
        us = uses.get(n + v, [])
        got = _summands(program, producer, deps, n, out) if us and v not in skip else None
        if not got or not got[0]:
            continue
        parts, straight = got
        per, ok = [], True
        for kind, x, scales in parts:
            times = " times a scalar" if scales else ""
            if kind == "id":
                plain = all(
                    u.split < 0 and (u.kind != "gather" or (u.site == "" and not scales))
                    for u in us
                )
                what = "straight-through" if straight else "a summand"
                fold = Fold(f"{what} (identity Jacobian{times})", scales=scales)
                per.append(
                    (x[0], [dataclasses.replace(lead_chain(u, x[1]), fold=fold) for u in us])
                )
                ok = ok and plain
                continue
            e, perm = program.eqns[x[0]], x[1]
            for p in (0, 1):
                got = _scaled_alias(program, producer, deps, n, e.ins[p])
                if got is None:
                    continue
                theta, own = got
                m = e.ins[1 - p]
                is_leaf = _scaled_alias(program, producer, deps, n, m) is not None
                own = (*scales, *own)  # (M's scalars are in its value)
                times = " times a scalar" if own else ""
                what = (
                    f"times {'a parameter' if is_leaf else 'an example-independent'} matrix "
                    f"on the {'right' if p == 0 else 'left'}{times}"
                )
                folded = [_folded_use(program, u, e, p, theta[1], what, own, perm) for u in us]
                ok = ok and None not in folded
                per.append((theta[0], folded))
        if ok:
            found[v] = per
    found = closed(found, deps, outputs, uses, n)
    out: dict = {}
    for per in found.values():
        for j, us in per:
            out.setdefault(j, []).extend(us)
    return out, tuple(found)
