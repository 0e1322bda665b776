"""Data: synthetic phantoms, NIfTI / DICOM ingestion, preprocessing cache and training loaders.

Kept light on purpose: import the submodules (``mambamim.data.synth``,
``mambamim.data.loaders``, ...) directly; nothing heavy is imported here.
"""
