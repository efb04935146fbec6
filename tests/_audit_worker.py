"""Subprocess side of tests/test_privacy_audit.py's mesh audit: 4 emulated CPU devices.

Audits ``fit(..., privacy=..., mesh=data_mesh(4))`` exactly as the one-device test audits
``fit``: the same linear problem, canaries, claim and broken copy (σ/10), and prints
``RESULT {json}``. It runs in its own process so that the rest of the suite keeps one device.
"""

from __future__ import annotations

import json
import os
import sys

# Fast compiles, as in the test processes and the sharding workers (tests/_xla_flags.py): the
# programs and their values are fixed before code generation, and compiling is most of this
# worker's CPU.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _xla_flags import FAST_COMPILE

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}"
os.environ["JAX_PLATFORMS"] = "cpu"


def main() -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import test_privacy_audit as t  # the problem, the train closure and the audit helper

    import jaxgrad

    mesh = jaxgrad.sharding.data_mesh(4)
    claims, sigmas = [], []
    config = jaxgrad.train.PrivacyConfig(l2_clip=t.CLIP, target_epsilon=t.TARGET, delta=t.DELTA)
    correct = t.run_audit(t.fit_train(config, claims, mesh=mesh, sigmas=sigmas))
    # σ/10 of the σ the correct run calibrated and used (as in the one-device test)
    weak = jaxgrad.train.PrivacyConfig(
        l2_clip=t.CLIP, noise_multiplier=sigmas[0] / 10, delta=t.DELTA
    )
    broken = t.run_audit(t.fit_train(weak, claims, mesh=mesh))
    return {
        "devices": int(mesh.devices.size),
        "claim": claims[0],
        "correct": [correct.epsilon_lower, correct.num_correct],
        "broken": [broken.epsilon_lower, broken.num_correct],
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(main()))
