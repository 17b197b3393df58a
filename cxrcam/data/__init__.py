"""Data stage: dataset readers, image decoding, box fusion, splits, the prepare cache, synthetic data.

Public API (import from the submodules; this package stays import-light so worker processes
start fast): ``images.read_image``, ``readers.read_dataset``, ``fusion.fuse_boxes``,
``splits.assign_folds``, ``cache.prepare`` / ``cache.open_cache``, ``synth.synthesize``,
``submission.read_submission`` / ``submission.write_submission`` (the competitions' submission format).
"""
