"""Deployment artefacts: the Kubernetes manifests (``deploy/kubernetes``) and their
offline check (``python -m deploy.check``, ``make deploy-check``)."""
