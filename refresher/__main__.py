"""``python -m refresher`` → the command-line interface."""

from refresher.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
