"""The ``ray`` flavor: the same deployer interface, with model servers on a Ray cluster (Ray Serve).

Only the flavor and its config are imported here; ray itself is imported by
:mod:`deployers.ray.deployer` (and the modules it uses), loaded on use.
Nothing outside this package imports ray (tests/test_ray.py checks it).
"""

from __future__ import annotations

from deployers.ray.flavor import RayServeModelDeployerConfig, RayServeModelDeployerFlavor

__all__ = ["RayServeModelDeployerConfig", "RayServeModelDeployerFlavor"]
