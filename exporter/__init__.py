"""prefect-exporter: a Prometheus exporter for Prefect work pools, queues, workers and runs."""

__version__ = "0.1.0"
