"""Importers: a model in the format its owners hold -> a model folder the runtime loads by path.

``huggingface`` reads a Hugging Face DINOv2 / ViT folder (Curia) with its classification heads.
An importer needs the model's framework (the ``import`` extra: torch, transformers); running the
imported model does not. A failed import leaves nothing behind.
"""
