"""`python -m harness` is `bench` (for checkouts where the console script is not installed)."""

from harness.cli import app

if __name__ == "__main__":  # spawned workers import this module as __mp_main__: they must not rerun the CLI
    app(prog_name="bench")
