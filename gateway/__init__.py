"""The public gateway: authentication, routing, reflection, and the typed client."""
