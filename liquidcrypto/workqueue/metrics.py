"""Prometheus metrics of the work queue (default registry, ``liquidcrypto_wq_*``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TASKS_ENQUEUED = Counter(
    "liquidcrypto_wq_tasks_enqueued_total",
    "Tasks stored in ORCHESTRATOR_TASKS by enqueue, by whether the stream saw a duplicate id",
    ["duplicate"],
)
TASKS_DONE = Counter(
    "liquidcrypto_wq_tasks_total",
    "Task deliveries handled by workers, by outcome "
    "(success, retry, failure = dead-lettered, invalid = malformed/wrong result, declined, requeued, "
    "handed_back = arrived with no free slot, already_done, terminated = could not even be dead-lettered)",
    ["outcome"],
)
OK = TASKS_DONE.labels(outcome="success")
FAILED = TASKS_DONE.labels(outcome="failure")
TASK_SECONDS = Histogram(
    "liquidcrypto_wq_task_duration_seconds",
    "Handler run time of a task",
    buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 1, 5, 30, 120, 600, 3600),
)
WORKERS_FAILED = Gauge(
    "liquidcrypto_wq_workers_failed",
    "Workers in this process stopped by a permanent error (a conflicting consumer, an incompatible nats-py...)",
)
IN_FLIGHT = Gauge("liquidcrypto_wq_tasks_in_flight", "Tasks whose handler is running in this process")
RESULTS_COLLECTED = Counter("liquidcrypto_wq_results_collected_total", "Distinct results returned by collect_results")
DUPLICATE_RESULTS = Counter(
    "liquidcrypto_wq_duplicate_results_total", "Result messages dropped by consumer-side de-duplication"
)
RESULTS_TERMINATED = Counter(
    "liquidcrypto_wq_results_terminated_total",
    "Results subscribe_to_results could not even dead-letter: terminated, logged at error",
)
DEAD_LETTERS = Counter("liquidcrypto_wq_dead_letters_total", "Tasks moved to ORCHESTRATOR_DLQ")
CONSUMER_REBINDS = Counter(
    "liquidcrypto_wq_consumer_rebinds_total", "Pull subscriptions re-created (after reconnects or errors)"
)
