"""The orchestrator work queue: exactly-once task processing on JetStream.

Modules: ``models`` (task, result, dead letter), ``queue`` (``WorkQueue`` and the spec's
module-level functions), ``enqueue``, ``worker`` (processing, on
``liquidcrypto.nats.pull``), ``results`` (publishing and collecting results),
``dead_letters``, ``infra`` (its JetStream objects). The public names are exported by
``liquidcrypto``.
"""
