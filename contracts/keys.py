"""The Redis key layout, in one place.

Every key carries a Redis Cluster hash tag (the part in braces) so that keys that
change together in one MULTI/EXEC or Lua script live in one slot: a model's
versions, one consumer group's checkpoints, one user's sequence and features.

>>> keys = KeySpace("sr")
>>> keys.params_current("linucb")
'sr:params:{linucb}:current'
>>> keys.checkpoint("bandits", 3)
'sr:ckpt:{bandits}:3'
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Builds every Redis key streamrec uses, under one namespace prefix."""

    namespace: str = "streamrec"

    # Consumer checkpoints: one hash per (consumer group, partition number).
    def checkpoint(self, group: str, partition: int) -> str:
        return f"{self.namespace}:ckpt:{{{group}}}:{partition}"

    def checkpoint_epochs(self, group: str) -> str:
        # Outside checkpoint_pattern: deleting checkpoints (a rebuild) keeps epochs rising.
        return f"{self.namespace}:epochs:{{{group}}}"

    def checkpoint_pattern(self, group: str) -> str:
        return f"{self.namespace}:ckpt:{{{group}}}:*"

    # Parameter store (docs/decisions.md §8): content-addressed blobs, per-part
    # pointers, one manifest per version and a current pointer, all in the model's slot.
    def params_current(self, model: str) -> str:
        return f"{self.namespace}:params:{{{model}}}:current"

    def params_parts(self, model: str) -> str:
        return f"{self.namespace}:params:{{{model}}}:parts"

    def params_manifest(self, model: str, version: int) -> str:
        return f"{self.namespace}:params:{{{model}}}:manifest:{version}"

    def params_blob(self, model: str, part: str, digest: str) -> str:
        """One encoded part, named by its sha256: the same content is one key."""
        return f"{self.namespace}:params:{{{model}}}:blob:{part}:{digest}"

    def params_history(self, model: str) -> str:
        """Sorted set: retained version -> its publish time (Redis TIME, microseconds)."""
        return f"{self.namespace}:params:{{{model}}}:history"

    def params_pin(self, model: str) -> str:
        """Hash (version, reason, by, at): the version served instead of the newest."""
        return f"{self.namespace}:params:{{{model}}}:pin"

    def params_refs(self, model: str) -> str:
        """Hash: blob key -> how many retained manifests name it."""
        return f"{self.namespace}:params:{{{model}}}:refs"

    def params_sizes(self, model: str) -> str:
        """Hash: blob key -> its bytes, for every blob a retained manifest names."""
        return f"{self.namespace}:params:{{{model}}}:sizes"

    def params_retention(self, model: str) -> str:
        """Hash: live blob bytes, the last publish time and the retention tiers' cursors."""
        return f"{self.namespace}:params:{{{model}}}:retention"

    def params_fence(self, model: str) -> str:
        return f"{self.namespace}:params:{{{model}}}:fence"

    def params_channel(self, model: str) -> str:
        return f"{self.namespace}:params:{{{model}}}:updates"

    def models(self) -> str:
        return f"{self.namespace}:models"

    # Per-user state written by the sequences service.
    def sequence(self, user_id: str) -> str:
        return f"{self.namespace}:seq:{{{user_id}}}"

    def user_features(self, user_id: str) -> str:
        return f"{self.namespace}:ufeat:{{{user_id}}}"

    # The catalog serving draws candidates from; one slot for all of it.
    def catalog_popular(self) -> str:
        """Sorted set: item -> decayed click count (written by the embeddings service)."""
        return f"{self.namespace}:catalog:{{items}}:popular"

    def catalog_fresh(self) -> str:
        """Sorted set: item -> time it was first clicked (written by the embeddings service)."""
        return f"{self.namespace}:catalog:{{items}}:fresh"

    def catalog_features(self) -> str:
        """Hash: item -> feature vector as little-endian float32 bytes."""
        return f"{self.namespace}:catalog:{{items}}:features"

    def catalog_version(self) -> str:
        """Counter incremented by every catalog write."""
        return f"{self.namespace}:catalog:{{items}}:features:version"

    # Reloadable faiss index pointer.
    def index_current(self, name: str) -> str:
        return f"{self.namespace}:index:{{{name}}}:current"
