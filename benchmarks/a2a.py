"""A2A bus benchmark: ``python benchmarks/a2a.py [--quick]``."""

from liquidcrypto.bench.a2a import main

raise SystemExit(main())
