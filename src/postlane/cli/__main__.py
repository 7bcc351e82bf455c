"""``python -m postlane.cli``."""

from . import main

main()
