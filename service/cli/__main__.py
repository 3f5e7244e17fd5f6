"""`python -m service.cli`: the `attribution` command."""
import sys

from service.cli import main

sys.exit(main())
