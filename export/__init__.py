"""ul2x.export: conversion of checkpoints to and from other frameworks (docs/export.md).

`job.export` writes a checkpoint as Hugging Face transformers or plain safetensors
(`python -m ul2x.export`); `importer.import_hf` reads a transformers directory back
(`python -m ul2x.import_hf`); `mappings` holds the per-family tables that `hf` applies.
"""
