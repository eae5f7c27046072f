"""Work-queue benchmark: ``python benchmarks/work_queue.py [--quick]``."""

from liquidcrypto.bench.work_queue import main

raise SystemExit(main())
