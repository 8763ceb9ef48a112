"""Trained models: the artefact folder format, the registry, the classifier and segmenter wrappers.

Imports the core, nets/, imaging/ and routing/ (the classifiers' features); torch only lazily.
Not to be confused with the repository's ``models/`` folder, the registry these modules read.
"""
