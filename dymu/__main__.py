"""`python -m dymu` (and the `dymu` script) run the CLI. transformers' log level is set before
transformers is first imported: some releases warn at import time, and the CLI promises one
line on stderr for an error (library users keep transformers' defaults)."""

import os
import sys

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .cli import main as cli_main


def main() -> int:
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
