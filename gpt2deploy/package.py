"""Open a package directory: dims, variants, file integrity, atomic manifest updates."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError, VariantError
from .fsutil import sha256_file
from .manifest import MANIFEST_NAME, VARIANT_FILES, load_manifest, save_manifest
from .verifycache import open_cache


@dataclass(frozen=True)
class ModelDims:
    n_layer: int
    n_head: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    n_positions: int
    eos_token_id: int | None = None
    bos_token_id: int | None = None

    @classmethod
    def from_manifest(cls, model: dict) -> ModelDims:
        return cls(**{k: model.get(k) for k in cls.__dataclass_fields__})


class Package:
    """A gpt2deploy package on disk. ``Package.open(path)`` validates the manifest."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.dims = ModelDims.from_manifest(manifest["model"])

    @classmethod
    def open(cls, path: str | os.PathLike) -> Package:
        root = Path(path).absolute()
        return cls(root, load_manifest(root))

    # -- variants ---------------------------------------------------------------------------
    @property
    def variants(self) -> dict:
        return self.manifest["variants"]

    def variant(self, name: str) -> dict:
        if name not in self.variants:
            present = ", ".join(sorted(self.variants)) or "none"
            raise VariantError(f"variant '{name}' is not in package {self.root} (present: {present})")
        return self.variants[name]

    def variant_path(self, name: str) -> Path:
        return self.root / self.variant(name)["file"]

    @staticmethod
    def default_file(name: str) -> str:
        return VARIANT_FILES[name]

    # -- shared files -----------------------------------------------------------------------
    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def generation_defaults(self) -> dict:
        return dict(self.manifest.get("generation", {}))

    # -- integrity --------------------------------------------------------------------------
    def listed_files(self, variants: Iterable[str] | None = None) -> list[dict]:
        """File entries (path, sha256, size) of the shared files and the given variants (all if None)."""
        entries = list(self.manifest["files"].values())
        names = self.variants if variants is None else variants
        for name in names:
            entries.extend(self.variant(name)["files"])
        return entries

    def integrity_problems(
        self, variants: Iterable[str] | None = None, hashes: bool = True, remembered: bool = False
    ) -> list[str]:
        """One line per problem: missing file, size or sha256 mismatch, path escaping the package.

        ``remembered``: take digests of files unchanged since they were last hashed from the user's verify
        cache (see ``verifycache``); otherwise every file is read.
        """
        problems = []
        cache = open_cache() if hashes and remembered else None
        digest = cache.sha256 if cache is not None else sha256_file
        root = self.root.resolve()
        for entry in self.listed_files(variants):
            rel = entry["path"]
            p = self.root / rel
            try:
                real = p.resolve()
            except OSError:
                problems.append(f"{rel}: cannot be resolved")
                continue
            if root not in real.parents:
                problems.append(f"{rel}: points outside the package ({real}); packages must be self-contained")
                continue
            if not p.is_file():
                problems.append(f"{rel}: missing")
                continue
            size = p.stat().st_size
            if size != entry["size"]:
                problems.append(
                    f"{rel}: size {size} differs from the manifest's {entry['size']} (file changed or truncated)"
                )
                continue
            if hashes and digest(p) != entry["sha256"]:
                problems.append(f"{rel}: sha256 differs from the manifest (file modified)")
        if cache is not None:
            cache.save()
        return problems

    def check_integrity(self, variants: Iterable[str] | None = None) -> None:
        problems = self.integrity_problems(variants, remembered=True)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise IntegrityError(
                f"package {self.root} failed its integrity check: {problems[0]}{more}; "
                "rebuild the package or run 'gpt2deploy verify' for details"
            )

    # -- updates ----------------------------------------------------------------------------
    def update_manifest(self, change: Callable[[dict], None]) -> None:
        """Re-read the manifest, apply ``change`` to it and write it back atomically."""
        manifest = load_manifest(self.root)
        change(manifest)
        save_manifest(self.root, manifest)
        self.manifest = manifest
        self.dims = ModelDims.from_manifest(manifest["model"])

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME
