"""Tooling outside the service: ``bench`` (throughput and stage times), ``curia_shaped`` (a ViT-B/16
benchmark model), ``train_reference`` (training ``phantom-fm``), ``evaluate`` (held-out quality),
``render`` (a GSPS drawn over its image). Nothing in ``node.service`` imports these.
"""
