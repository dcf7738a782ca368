"""`python -m thawctl` and the `thawctl` console script."""

from __future__ import annotations

import sys


def main() -> int:
    from thawctl.cli import main as run

    return run(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
