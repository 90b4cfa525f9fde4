"""Shared fixtures: the real-weights file and the available backends."""

from __future__ import annotations

from pathlib import Path

import pytest

REAL_WEIGHTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "minilm-l6-layer0.safetensors"


@pytest.fixture(scope="session")
def real_weights():
    """The six MiniLM layer-0 matrices as float32 numpy arrays (skips when ../shared is absent)."""
    if not REAL_WEIGHTS.exists():
        pytest.skip(f"real weights not found at {REAL_WEIGHTS} (a user's clone has no ../shared)")
    from safetensors.numpy import load_file

    return load_file(str(REAL_WEIGHTS))
