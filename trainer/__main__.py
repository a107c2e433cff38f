"""`python -m trainer`, as torchrun starts it: `torchrun --nproc_per_node N -m trainer run ...`."""

import sys

from trainer.cli import main

sys.exit(main())
