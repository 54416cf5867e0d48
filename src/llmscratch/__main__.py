"""`python -m llmscratch` (and `torchrun ... -m llmscratch pretrain ...`): the `llmscratch` command."""

import sys

from llmscratch.cli import main

sys.exit(main())
