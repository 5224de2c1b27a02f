"""Fixtures shared by the whole suite, one module per real component."""

pytest_plugins = [
    "tests.fixtures.secrets",
    "tests.fixtures.temporal",
    "tests.fixtures.storage",
    "tests.fixtures.emulator",
    "tests.fixtures.pipeline",
]
