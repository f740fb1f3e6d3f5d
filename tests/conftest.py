"""Fixtures shared across test files live in tests/fixtures/<area>.py, one module per
area (data, model, server), registered here so every test can request them."""

pytest_plugins = [
    "tests.fixtures.data",
    "tests.fixtures.model",
    "tests.fixtures.registry",
    "tests.fixtures.server",
]
