"""Progressive cutover: plans (plan), gate statistics (gates), the driver (engine) and its
synthetic probes (probes). See the README's "Cutover" section."""

from shim.rollout.engine import RolloutEngine, RolloutHost

__all__ = ["RolloutEngine", "RolloutHost"]
