"""The ``streametl`` console script: the Faust app's own command line."""

from __future__ import annotations


def main() -> None:
    """Run ``streametl worker``, ``streametl agents`` and the app's own commands."""
    from app import app

    app.main()


if __name__ == "__main__":
    main()
