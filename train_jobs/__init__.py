"""Training jobs, each runnable as ``python -m train_jobs.<name>`` or through ``ray job submit``.

- ``safety``: the content-safety classifier (Ray Train V2, DDP) → model store.
- ``sweep``: Ray Tune ASHA over backbone × pooling × bilinear variant × lr.
- ``defaults``: the small default weights shipped in ``livelens/resources/default_models``.
"""
