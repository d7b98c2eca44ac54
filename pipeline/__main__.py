import os
import sys

from pipeline.cli import main

code = main()
if code:
    # After a failed stage, pyarrow's worker threads can abort the interpreter's shutdown ("terminate
    # called without an active exception", apache/arrow#34314), turning exit 2 into 134 now and then.
    # Everything the stage owned is cleaned up by now: leave without the shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
