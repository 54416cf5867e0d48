"""`python -m llmscratch.cli`: the `llmscratch` command."""

import sys

from llmscratch.cli import main

sys.exit(main())
