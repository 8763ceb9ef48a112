"""The node as a running service: ``run_node`` wires the DICOM edge, the store, an engine and the retention
sweeper; ``run_stack``/``run_demo`` run Orthanc with the node on loopback.

Imports any wing except cli/ (the composition root).
"""
