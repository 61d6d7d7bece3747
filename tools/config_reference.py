"""Writes docs/config.md, the reference of every config key, from the schema in utils/config.py.

    python -m tools.config_reference            # rewrite docs/config.md
    python -m tools.config_reference --check    # exit 1 when docs/config.md is stale

Run it after adding or changing a key; tests/test_config.py fails while the page is stale.
"""
from __future__ import annotations

import argparse
import os
import sys

from utils.config import reference_page

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "config.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the page is current")
    args = parser.parse_args(argv)
    page = reference_page()
    if args.check:
        with open(PAGE, encoding="utf-8") as f:
            current = f.read() == page
        if not current:
            print(f"{PAGE} is stale: run python -m tools.config_reference", file=sys.stderr)
        return 0 if current else 1
    with open(PAGE, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
