"""``python -m sci_node.cli``: the ``sci-node`` command (the Orthanc stack starts the node this way)."""
from sci_node.cli.main import entrypoint

entrypoint()
