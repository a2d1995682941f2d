"""Helpers every package may use: atomic files and checksums (``fs``), where this process stands in
a distributed job (``dist``), a directory's lock and exiting with the parent (``process``),
human-readable numbers (``fmt``), optional packages (``extras``) and allocator profiles (``memory``).

May import: nothing of mtnlg (the standard library, torch.distributed, importlib.metadata only).
"""
