"""Studies that reproduce numbers and figures of docs/models.md and docs/classifiers.md; they write no artefact
the node runs (reports, scores, the architecture comparison, the 3-D probe, example figures, infer checks).
"""
