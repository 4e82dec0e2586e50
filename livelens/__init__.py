"""livelens: image recognition for live-streaming platforms.

The core package shared by serving (``serve_apps``) and training (``train_jobs``):
models, evidence, data manifests, OCR, quality measures, the label taxonomy and the
model store.
"""

__version__ = "0.1.0"
