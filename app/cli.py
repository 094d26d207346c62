"""The ``streametl`` console script: the Faust app's own command line."""

from __future__ import annotations

import sys


def main() -> None:
    """Run ``streametl worker``, ``streametl agents`` and the app's own commands."""
    from app import app, settings

    if settings.log_format == "json" and "worker" in sys.argv[1:] and not {"-q", "--quiet"} & set(sys.argv):
        # Faust's banner and spinner are printed outside logging: off, so every line of
        # the output is a JSON log record (Faust's --quiet, a global option).
        sys.argv.insert(1, "--quiet")
    app.main()


if __name__ == "__main__":
    main()
