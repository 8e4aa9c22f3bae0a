"""The run service: agents and their supervised runs (schema ``runs``)."""
