"""Shared test settings: exact fp32 matmuls so parity tests compare like with like."""

import os
import pathlib

import jax

jax.config.update("jax_default_matmul_precision", "highest")

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
