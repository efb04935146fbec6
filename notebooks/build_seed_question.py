"""Writes notebooks/seed_question.ipynb from the cells below (run: python notebooks/build_seed_question.py).

Keeping the notebook's source in a plain script keeps its diffs readable; the test suite
executes the .ipynb itself.
"""

from pathlib import Path

import nbformat

md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell

cells = [
    md(
        "# The seed question: average the errors, or average the gradients?\n\n"
        "In SGD with a batch of $N$ examples, do we backpropagate the batch's average error, or "
        "backpropagate every example and average the gradients?\n\n"
        "**Answer.** The gradient of the batch's mean loss *is* the mean of the per-example "
        "gradients, because differentiation is linear:\n\n"
        "$$\\nabla \\tfrac1N \\textstyle\\sum_i l_i(\\theta) = \\tfrac1N \\sum_i \\nabla l_i(\\theta).$$\n\n"
        "What is *not* the same is averaging **before a nonlinearity**: the gradient at the mean "
        "input, an averaged error signal pushed back through nonlinear layers, or a mean of "
        "microbatch means over unequal counts. This notebook measures each, in float64."
    ),
    code(
        "import jax\n"
        "jax.config.update('jax_enable_x64', True)\n"
        "import jax.numpy as jnp\n"
        "import matplotlib\n"
        "matplotlib.use('Agg')\n"
        "import matplotlib.pyplot as plt\n"
        "%matplotlib inline\n"
        "import jaxgrad\n"
        "from jaxgrad import losses, models, naive"
    ),
    md("## 1. The seed's numbers\n\n`python -m jaxgrad.seed` prints the same table."),
    code(
        "from jaxgrad.seed import seed_results, format_results\n"
        "results = seed_results()\n"
        "print(format_results(results))\n"
        "assert abs(results['sigmoid.mean_of_grads'] - 0.2233) < 1e-4\n"
        "assert abs(results['sigmoid.grad_at_mean'] - 0.2350) < 1e-4\n"
        "assert results['line_fit.max_abs_diff'] < 1e-12"
    ),
    md(
        "## 2. The gradient at the mean input drifts as the inputs spread\n\n"
        "Two inputs $0.5 \\pm s$ through a sigmoid: the mean of the gradients "
        "$\\tfrac12(\\sigma'(0.5-s) + \\sigma'(0.5+s))$ against the gradient at the mean "
        "$\\sigma'(0.5)$, which does not move. At $s = 0$ they agree; they part as soon as the "
        "examples differ."
    ),
    code(
        "loss = lambda theta, x: jax.nn.sigmoid(theta + x)\n"
        "mean_of_grads = jaxgrad.mean_of_per_example_grads(loss)\n"
        "grad_at_mean = naive.grad_at_mean_input(loss)\n"
        "spreads = jnp.linspace(0.0, 4.0, 41)\n"
        "theta = jnp.zeros(())\n"
        "true = [float(mean_of_grads(theta, jnp.array([0.5 - s, 0.5 + s])).grads) for s in spreads]\n"
        "at_mean = [float(grad_at_mean(theta, jnp.array([0.5 - s, 0.5 + s])).grads) for s in spreads]\n"
        "fig, ax = plt.subplots(figsize=(6, 3.5))\n"
        "ax.plot(spreads, true, label='mean of gradients (exact)')\n"
        "ax.plot(spreads, at_mean, '--', label='gradient at the mean input')\n"
        "ax.set_xlabel('spread s of the inputs 0.5 ± s'); ax.set_ylabel('dσ/dθ')\n"
        "ax.legend(); ax.grid(alpha=0.3); plt.show()"
    ),
    md(
        "## 3. Averaging the error signal, layer by layer\n\n"
        "`naive.backprop_mean_error` averages the output error $\\delta_i$ over the batch and "
        "backpropagates $\\bar\\delta$ through every example's network. For the last dense layer "
        "the error is exactly the cross-covariance $\\tfrac1N \\sum_i (a_i-\\bar a)"
        "(\\delta_i-\\bar\\delta)^T$; deeper layers inherit it through the nonlinearities."
    ),
    code(
        "model = models.mlp([8, 32, 32, 32, 3], activation='sigmoid', dtype=jnp.float64)\n"
        "params = model.init(jax.random.key(0))\n"
        "x = jax.random.normal(jax.random.key(1), (256, 8))\n"
        "y = jax.random.randint(jax.random.key(2), (256,), 0, 3)\n"
        "loss_fn = losses.supervised(model.apply, losses.softmax_cross_entropy, num_classes=3)\n"
        "table = jaxgrad.check.compare({\n"
        "    'batch_grad': jaxgrad.batch_grad(loss_fn),\n"
        "    'mean_of_per_example_grads': jaxgrad.mean_of_per_example_grads(loss_fn),\n"
        "    'backprop_mean_error': naive.backprop_mean_error(model.apply, losses.softmax_cross_entropy),\n"
        "}, params, (x, y))\n"
        "print(table)\n"
        "exact, wrong = table.outputs['batch_grad'], table.outputs['backprop_mean_error']\n"
        "rel = [float(jnp.linalg.norm(w['w'] - e['w']) / jnp.linalg.norm(e['w'])) for e, w in zip(exact, wrong)]\n"
        "fig, ax = plt.subplots(figsize=(6, 3.5))\n"
        "ax.bar([f'layer {i + 1}' for i in range(len(rel))], rel)\n"
        "ax.set_ylabel('relative error of ∂L/∂W'); ax.set_yscale('log')\n"
        "ax.set_title('backprop of the mean error vs exact gradient'); plt.show()\n"
        "assert table.rows[0].max_abs_diff < 1e-12  # the two exact orders agree"
    ),
    md(
        "## 4. A mean of microbatch means over unequal counts\n\n"
        "Token-level losses return `(loss_sum, n_tokens)`. Averaging each microbatch's mean "
        "weights a microbatch of 3 tokens as much as one of 300. `accumulate_grad` adds sums "
        "and counts and divides once, so it stays exact however unbalanced the split."
    ),
    code(
        "tm = models.transformer(vocab_size=16, max_len=16, dtype=jnp.float64)\n"
        "tparams = tm.init(jax.random.key(3))\n"
        "tloss = losses.supervised(tm.apply, losses.token_cross_entropy)\n"
        "tokens = jax.random.randint(jax.random.key(4), (8, 16), 1, 16)\n"
        "exact_f = jaxgrad.batch_grad(tloss)\n"
        "acc_f = jaxgrad.accumulate_grad(tloss, num_microbatches=2)\n"
        "naive_f = naive.mean_of_microbatch_means(tloss, num_microbatches=2)\n"
        "short_lengths = [16, 12, 8, 4, 2, 1]\n"
        "naive_err, acc_err = [], []\n"
        "for short in short_lengths:\n"
        "    lengths = jnp.array([16] * 4 + [short] * 4)  # 2nd microbatch: shorter sequences\n"
        "    toks = jnp.where(jnp.arange(16)[None] < lengths[:, None], tokens, 0)\n"
        "    batch = (toks, toks)\n"
        "    exact = exact_f(tparams, batch).grads\n"
        "    naive_err.append(jaxgrad.check.tree_diff(naive_f(tparams, batch).grads, exact)[2])\n"
        "    acc_err.append(jaxgrad.check.tree_diff(acc_f(tparams, batch).grads, exact)[2])\n"
        "fig, ax = plt.subplots(figsize=(6, 3.5))\n"
        "ax.semilogy(short_lengths, naive_err, 'o-', label='mean of microbatch means')\n"
        "ax.semilogy(short_lengths, [max(e, 1e-17) for e in acc_err], 's-', label='accumulate_grad (exact)')\n"
        "ax.set_xlabel('tokens per sequence in the 2nd microbatch (1st: 16)')\n"
        "ax.set_ylabel('relative error vs batch_grad'); ax.invert_xaxis(); ax.legend(); plt.show()\n"
        "assert max(acc_err) < 1e-12 and naive_err[0] < 1e-12 and naive_err[-1] > 1e-2"
    ),
    md(
        "## Takeaway\n\n"
        "* `batch_grad`, `mean_of_per_example_grads` and `accumulate_grad` are the same number "
        "(to float64 round-off): pick the cheapest, which is almost always `batch_grad`.\n"
        "* The gradient at the mean input, the backpropagated mean error and the mean of "
        "microbatch means are different quantities; their errors grow with how much the "
        "examples (or the counts) differ, and vanish only where the model is linear in the data "
        "or the counts are equal."
    ),
]

nb = nbformat.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
Path(__file__).with_name("seed_question.ipynb").write_text(nbformat.writes(nb))
