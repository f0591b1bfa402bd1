"""``python -m bnfold``: the same as the ``bnfold`` console script."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main()
