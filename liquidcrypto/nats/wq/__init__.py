"""The orchestrator work queue's parts: models, enqueue, worker, results, dead letters.

The public face is ``liquidcrypto.nats.work_queue``.
"""
