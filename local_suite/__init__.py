"""The suite on one machine: the launcher behind ``make run`` and the embedded
PostgreSQL it (and the tests) start when no external database is configured."""
