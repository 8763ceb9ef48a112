"""The two segmenters (cord, lesion): BIDS data and synthetic volumes, the training loop, held-out evaluation,
fold assembly, seed ensembles, threshold recalibration and re-scoring, and fine-tuning on corrections.
"""
