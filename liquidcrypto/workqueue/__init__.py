"""The orchestrator work queue: exactly-once task processing on JetStream.

Modules: ``models`` (task, result, dead letter), ``queue`` (``WorkQueue`` and the spec's
module-level functions), ``enqueue``, ``worker`` / ``puller`` (processing), ``results``
(collection), ``dead_letters``, ``infra`` (its JetStream objects). The public names are
exported by ``liquidcrypto``.
"""
