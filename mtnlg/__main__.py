"""``python -m mtnlg <command>``."""

from mtnlg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
