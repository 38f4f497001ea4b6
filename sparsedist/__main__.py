"""`python -m sparsedist ...`: the `sparsedist` command, for a job's working directory where the console
script is not installed (`ray job submit ... -- python -m sparsedist train ...`)."""

import sys

from sparsedist.cli import main

sys.exit(main())
