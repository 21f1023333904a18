"""`python -m backends.worker SPEC_JSON IN_ADDR OWNER_ADDR`: one engine worker process."""

import sys

from backends.worker.server import main

sys.exit(main(sys.argv[1:]))
