import atexit
import logging
import os
import sys

from pipeline.cli import main

code = main()
# Everything a stage owns is written, closed and renamed into place (or cleaned up) by now: leave without the
# interpreter's shutdown. After a failed stage, pyarrow's worker threads can abort that shutdown ("terminate
# called without an active exception", apache/arrow#34314), turning exit 2 into 134 now and then; after a
# train run it only frees TensorFlow's traced graphs, one object at a time: measured 1.5-6 s of the process
# wall of `train` on real ML-100K (load 2-10). atexit handlers (temporary files' finalizers among them) still run.
atexit._run_exitfuncs()
logging.shutdown()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
