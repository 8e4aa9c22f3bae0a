"""``python -m paperclip_cli``: the same as the ``paperclip`` command."""

from paperclip_cli.main import main

main()
