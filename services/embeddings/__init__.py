"""Item embeddings learned online from click sequences (Item2Vec).

The learner here knows nothing of Kafka or Redis: sequences in, vectors and
named-array state out. The embeddings service feeds it and publishes its
vectors to the reloadable faiss index (:mod:`services.index`).
"""

from __future__ import annotations

from services.embeddings.item2vec import Item2Vec

__all__ = ["Item2Vec"]
