"""`python -m fedir.cli`: the same as the `fedir` command."""

import sys

from fedir.cli import main

sys.exit(main())
