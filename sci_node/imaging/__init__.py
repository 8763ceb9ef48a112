"""Image math shared by the node and the trainer: pure functions on arrays and ``SimpleITK`` images.

Preprocessing, mask post-processing and cord/lesion measures; no DICOM, no files, no network, no torch.
"""
