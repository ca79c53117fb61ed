"""Open a package directory: dims, variants, file integrity, atomic manifest updates."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import IntegrityError, VariantError
from .fsutil import sha256_file
from .manifest import MANIFEST_NAME, VARIANT_FILES, load_manifest, save_manifest
from .schema import ModelDims, PackageSpec, Variant, parse_manifest
from .verifycache import open_cache

__all__ = ["ModelDims", "Package", "Variant"]


class Package:
    """A gpt2deploy package on disk. ``Package.open(path)`` validates the manifest (``schema``) once:
    ``spec`` holds the typed result, ``variant_spec(name)`` one variant with its paths resolved."""

    def __init__(self, root: Path, manifest: dict, spec: PackageSpec | None = None):
        self.root = root
        self.manifest = manifest
        self.spec = spec if spec is not None else parse_manifest(manifest, root)
        self.dims = self.spec.dims

    @classmethod
    def open(cls, path: str | os.PathLike) -> Package:
        root = Path(path).absolute()
        return cls(root, load_manifest(root))

    # -- variants ---------------------------------------------------------------------------
    @property
    def variants(self) -> dict:
        """Raw manifest entries of the valid variants, by name."""
        return {n: self.manifest["variants"][n] for n in self.spec.variants}

    def variant_spec(self, name: str) -> Variant:
        """The validated variant ``name`` (VariantError listing the present ones when absent)."""
        if not isinstance(name, str):
            raise VariantError(f"a variant name must be a string (got {type(name).__name__})")
        if name not in self.spec.variants:
            present = ", ".join(sorted(self.spec.variants)) or "none"
            raise VariantError(f"variant '{name[:64]}' is not in package {self.root} (present: {present})")
        return self.spec.variants[name]

    def variant(self, name: str) -> dict:
        self.variant_spec(name)
        return self.manifest["variants"][name]

    def variant_path(self, name: str) -> Path:
        return self.root / self.variant_spec(name).file

    @staticmethod
    def default_file(name: str) -> str:
        return VARIANT_FILES[name]

    # -- shared files -----------------------------------------------------------------------
    @property
    def tokenizer_path(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def generation_defaults(self) -> dict:
        return dict(self.spec.generation)

    # -- integrity --------------------------------------------------------------------------
    def listed_files(self, variants: Iterable[str] | None = None) -> list[dict]:
        """File entries (path, sha256, size) of the shared files and the given variants (all if None)."""
        entries = [e.as_dict() for e in self.spec.files]
        names = self.spec.variants if variants is None else variants
        for name in names:
            entries.extend(e.as_dict() for e in self.variant_spec(name).files)
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
            except (OSError, RuntimeError):
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

    def contained(self, variant: str) -> None:
        """IntegrityError unless every file of ``variant`` resolves inside the package (symlinks followed).

        ``load(verify=False)`` runs this instead of the full check: no hashes, but never a file from elsewhere."""
        root = self.root.resolve()
        for entry in self.variant_spec(variant).files:
            try:
                real = entry.local.resolve()
            except (OSError, RuntimeError):
                real = None
            if real is None or (root not in real.parents):
                raise IntegrityError(
                    f"package {self.root}: {entry.path} points outside the package ({real}); "
                    "packages must be self-contained, copy the file in"
                )

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
        spec = parse_manifest(manifest, self.root)  # never write a manifest the reader would refuse
        save_manifest(self.root, manifest)
        self.manifest, self.spec, self.dims = manifest, spec, spec.dims

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME
