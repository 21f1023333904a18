"""`python -m backends.worker SPEC_JSON IN_ADDR OWNER_ADDR`: one engine worker process."""

import sys

from backends.worker.preload import keep_crash_reports, load_engine_libraries

keep_crash_reports()
load_engine_libraries(sys.argv[1] if len(sys.argv) > 1 else "")

from backends.worker.server import main  # noqa: E402  (after the engine's native libraries)

sys.exit(main(sys.argv[1:]))
