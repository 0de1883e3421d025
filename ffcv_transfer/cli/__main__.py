"""`python -m ffcv_transfer.cli ...`: the `ffcv-transfer` command."""

import sys

from ffcv_transfer.cli import main

sys.exit(main())
