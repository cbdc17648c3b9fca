"""`python -m dgemma ...` (what `torchrun -m dgemma finetune ...` runs): the `dgemma` command."""

import sys

from dgemma.cli import main

sys.exit(main())
