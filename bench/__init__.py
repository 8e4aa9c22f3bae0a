"""``make bench``: throughput and latency of the suite against same-run ceilings."""
