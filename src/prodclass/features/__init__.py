"""Features: registered image backbones (``create_backbone``) and the content-hash keyed
embedding cache.

Images go in, embeddings come out, through the one batched path of :mod:`prodclass.inference`.
"""
