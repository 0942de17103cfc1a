"""Tests of the SP-MoE subsystem (a package, so its module names stay unique)."""
