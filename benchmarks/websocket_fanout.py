"""WebSocket fan-out benchmark: ``python benchmarks/websocket_fanout.py [--quick]``."""

from liquidcrypto.bench.websocket_fanout import main

raise SystemExit(main())
