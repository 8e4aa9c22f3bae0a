"""The ``paperclip`` command line: operators' everyday work through the gateway."""
