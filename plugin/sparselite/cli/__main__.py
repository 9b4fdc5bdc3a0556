"""``python -m sparselite.cli``: the same as the ``sparselite`` command."""

from sparselite.cli import main

main()
