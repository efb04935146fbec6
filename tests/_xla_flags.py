"""The XLA flags every test process and test subprocess compiles with (tests/conftest.py says
why): LLVM at -O0.

What the tests check is fixed before code generation, and the optimisation level changes only
how fast the machine code is made and runs, not what it computes. Compiling is most of the
suite's CPU time.

Not here: ``--xla_cpu_use_fusion_emitters=false`` (XLA:CPU's older loop emitters), which
halves compile times again (jaxgrad's 17 benchmark strategies on the four tiny models: 71 s
-> 32 s of CPU) but is another code generator than the one users run: it computes ``jax.grad``
of a uint8-indexed lookup into a 300-row table wrongly (norms 1-11 % off; the indices are
clamped in their own dtype), and sharded noise differs from the one-device draw in its last
bits, so the suite would test a compiler users do not have.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"
