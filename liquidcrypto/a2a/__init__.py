"""The agent-to-agent bus: tasks and events between agents on NATS.

Modules: ``envelope`` (the wire model), ``bus`` (``A2ABus``), ``durable`` (durable task
consumers), ``history`` (replay), ``lifecycle`` (task states in KV), ``registry``
(agent cards and liveness), ``replies`` (request/reply), ``default`` (the spec's
module-level functions on the default client). The public names are exported by
``liquidcrypto``.
"""
