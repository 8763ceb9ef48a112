"""The three classifiers (anatomy, region_view, sequence): datasets, synthetic and non-spine scenes, training
with cross-validation, metrics, seed ensembles; each writes a model artefact the node's registry admits.
"""
