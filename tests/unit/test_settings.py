"""Settings classes: what the environment sets and what code passes both reach the service."""

from __future__ import annotations

from pathlib import Path

from services.embeddings.service import EmbeddingsSettings


def test_a_snapshot_dir_passed_in_code_is_used(tmp_path: Path, monkeypatch) -> None:
    """The field has environment aliases; passing it by name must still work (it was
    silently ignored, so tests wrote snapshots into the working directory)."""
    monkeypatch.delenv("STREAMREC_SNAPSHOT_DIR", raising=False)
    assert EmbeddingsSettings(snapshot_dir=tmp_path).snapshot_dir == tmp_path
    monkeypatch.setenv("STREAMREC_SNAPSHOT_DIR", str(tmp_path / "env"))
    assert EmbeddingsSettings().snapshot_dir == tmp_path / "env"
