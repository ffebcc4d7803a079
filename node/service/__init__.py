"""The node as a service: the Orthanc plugin's queue, the worker and its deliveries.

``queue`` (durable jobs, deliveries, counters; stdlib only, shared with the plugin),
``worker`` (lease -> fetch -> context -> pipeline -> store), ``delivery`` (the outbox sender),
``egress`` (C-STORE / STOW-RS / webhook), ``orthanc`` (REST client), ``priors`` and ``retrieve``
(the prior study from Orthanc or a PACS), ``metrics`` (Prometheus, health), ``supervisor``
(``pacs-node serve``: Orthanc and the worker as child processes).
"""
