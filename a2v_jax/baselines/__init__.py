"""Yardsticks the JAX engine is measured against (not used by training)."""
